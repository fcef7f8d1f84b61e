# CRLD trainer on NVIDIA's PyTorch container (PyTorch, CUDA, cuDNN, NCCL and DALI come from the image).
#   docker build -t crld .
#   docker run --gpus all --ipc=host -v "$PWD/data:/workspace/crld/data" -v "$PWD/runs:/workspace/crld/runs" \
#       crld torchrun --nproc_per_node=8 train.py --config configs/imagenet/crld/r34_r18.yaml
#   docker run --gpus all crld python -m pytest -m cuda tests/cuda     # the GPU checks
# 25.10: PyTorch 2.9 built for CUDA 13.0 (matching the project's cu130 torch and nvidia-dali-cuda130), Python 3.12.
FROM nvcr.io/nvidia/pytorch:25.10-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# System libraries FFCV's extension builds against (pkg-config finds libturbojpeg and opencv4).
# Unpinned apt versions on purpose (DL3008): pins break whenever Ubuntu refreshes its archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        pkg-config libturbojpeg0-dev libopencv-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/crld

# Python dependencies, before the sources so that code edits reuse this layer.
# The image's own torch, torchvision, numpy and DALI stay: their lines are dropped from requirements.txt and
# their installed versions become the constraints (a dependency asking for another version fails the build
# instead of silently swapping the CUDA build). The image's blanket PIP_CONSTRAINT (/etc/pip/constraint.txt,
# every package it ships) is lifted for these two commands so the project's other pins (pillow, PyYAML, ...)
# can apply.
COPY requirements.txt requirements-ffcv.txt ./
RUN pip list --format=freeze | grep -iE '^(torch|torchvision|numpy|nvidia-dali[a-z0-9-]*)==' > /tmp/keep-image.txt \
    && grep -viE '^(torch|torchvision|numpy|nvidia-dali[a-z0-9-]*)([=<>~!;[ ]|$)' requirements.txt \
        > /tmp/requirements-image.txt \
    && PIP_CONSTRAINT='' pip install --no-cache-dir -c /tmp/keep-image.txt -r /tmp/requirements-image.txt \
    && pkg-config --exists libturbojpeg opencv4 \
    && PIP_CONSTRAINT='' pip install --no-cache-dir --no-build-isolation -c /tmp/keep-image.txt \
        -r requirements-ffcv.txt \
    && python -c "import torch, ffcv, nvidia.dali; print('torch', torch.__version__, '| ffcv ok | dali ok')"

COPY . /workspace/crld
# The project itself (editable, no dependencies: they are all in place), so every script imports its packages;
# -I: the check imports from site-packages, not from the working directory.
RUN PIP_CONSTRAINT='' pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && python -I -c "import common, pipelines, training, datasets_prep"

CMD ["python", "train.py", "--help"]
