#!/usr/bin/env bash
# The data path on one GPU, every figure beside its reference in the same call, into OUT_DIR/{env.txt,*.json,*.txt}:
#   step        bench.py step, ResNet34 -> ResNet18 at 224 (synthetic batches, online teacher and cache): the
#               speed the data path must feed
#   loader      bench.py loader: `torch` (16 workers) vs `dali` on the accelerator route (nvJPEG, views cut
#               in DALI, strong view batched on the device), with Python calls per batch
#   strong      scripts/strong_programs.py: the two strong-view programs (`pipeline.strong_program`) on the
#               same crops: ATen calls, host ms and wall ms per batch
#   loader_graph bench.py loader: `dali` on the accelerator route with pipeline.strong_program=graph
#   dali_host   bench.py loader: `dali` on the host route (CPU decode and cuts) on the same cores
#   e2e         bench.py e2e, the ResNet pair end to end: `torch` (the reference) vs `dali`, online and cache
#   e2e_graph   (not in the default set) e2e of `dali` alone with pipeline.strong_program=graph
#   cifar_step  bench.py step, resnet32x4 -> resnet8x4 at 32
#   cifar_e2e   bench.py e2e, the CIFAR pair end to end: `torch` vs `gpu` (the GPU-resident array route) on
#               a CIFAR-100-shaped set of random pixels (datasets_prep/make_cifar_like.py)
# The JPEG set holds enough images (N, default 8000 at batch 256) that the timed e2e steps cross no epoch
# boundary.
#   bash scripts/gpu_dali.sh OUT_DIR [N_IMAGES]
#   DALI_SITE=/tmp/site bash scripts/gpu_dali.sh OUT   # DALI's packages unpacked into a folder, not installed
#   DEVICE=cpu BATCH=16 STEPS=2 IMAGE=64 CIFAR_N=512 bash scripts/gpu_dali.sh OUT 64   # a dry run of the code paths
#   STAGES="loader e2e" bash scripts/gpu_dali.sh OUT      # a subset of the stages above
# Stops at 9 minutes; each stage's figures are written when it ends.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_dali.sh OUT_DIR [N_IMAGES]" >&2
  exit 2
fi
OUT=$1
N=${2:-8000}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
IMAGE=${IMAGE:-224}
DATA=${DATA:-/tmp/jpeg_gpu_dali}
CIFAR=${CIFAR:-/tmp/cifar_like}
CIFAR_N=${CIFAR_N:-50000}
CORES=$(nproc)
STAGES=" ${STAGES:-step strong loader loader_graph dali_host e2e cifar_step cifar_e2e} "
if [ -n "${DALI_SITE:-}" ]; then
  export DALI_SITE PYTHONPATH="$DALI_SITE${PYTHONPATH:+:$PYTHONPATH}"
  export LD_LIBRARY_PATH="$DALI_SITE/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
END=$((SECONDS + 540))

py() {  # DALI_SITE's `nvidia` folder joins an installed `nvidia` package (CUDA wheels ship one)
  local left=$((END - SECONDS))
  [ "$left" -gt 5 ] || { echo "gpu_dali: out of time before: $*" >&2; return 124; }
  timeout -k 10 "$left" "$PY" - "$@" <<'PYEOF'
import os, runpy, sys
site = os.environ.get("DALI_SITE")
if site:
    import nvidia
    if os.path.join(site, "nvidia") not in list(nvidia.__path__):
        nvidia.__path__.append(os.path.join(site, "nvidia"))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
PYEOF
}

{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  echo "cores: $CORES"
  echo 'import torch, nvidia.dali as d; print("torch", torch.__version__, torch.version.cuda, "dali", d.__version__)' \
    > "$OUT/env_check.py"
  py "$OUT/env_check.py" && rm "$OUT/env_check.py"
  git log -1 --format=%H 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

want() { [[ $STAGES == *" $1 "* ]]; }
status=0
run() {  # run NAME ARGS...: bench.py ARGS, figures into OUT/NAME.{json,txt}
  local name=$1
  shift
  py bench.py "$@" --device "$DEVICE" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt" || status=$?
}
R34=(--teacher imagenet_resnet34 --student imagenet_resnet18 --num-classes 1000 --image-size "$IMAGE"
     --batch-size "$BATCH" --steps "$STEPS" --teacher-source online,cache)
CIFAR_PAIR=(--teacher resnet32x4 --student resnet8x4 --image-size 32 --batch-size "$BATCH" --steps "$STEPS"
            --teacher-source online,cache)
LOADER=(--data "$DATA" --image-size "$IMAGE" --batch-size "$BATCH" --batches "$STEPS" --warmup 3 --workers "$CORES")
if want loader || want loader_graph || want dali_host || want e2e || want e2e_graph; then
  [ -d "$DATA/train" ] || py datasets_prep/make_jpeg_folder.py --out "$DATA" --train "$N" --val 16 --classes 8
fi
! want step || run step step "${R34[@]}" --warmup 5
if want strong; then
  py scripts/strong_programs.py --device "$DEVICE" --batch-size "$BATCH" --size "$IMAGE" --batches "$STEPS" \
    --json "$OUT/strong_programs.json" 2>&1 | tee "$OUT/strong_programs.txt" || status=$?
fi
! want loader || run loader loader --pipelines torch,dali --repeat 3 "${LOADER[@]}"
! want loader_graph || run loader_graph loader --pipelines dali --repeat 1 "${LOADER[@]}" pipeline.strong_program=graph
! want dali_host || run loader_dali_host loader --pipelines dali --repeat 1 "${LOADER[@]}" pipeline.route=host
! want e2e || run e2e e2e --pipelines torch,dali --data "$DATA" --dataset imagefolder "${R34[@]}" --warmup 5 \
  --workers "$CORES" --num-classes 8 data.train_crop=rrc "data.val_resize=$IMAGE"
! want e2e_graph || run e2e_graph e2e --pipelines dali --data "$DATA" --dataset imagefolder "${R34[@]}" --warmup 5 \
  --workers "$CORES" --num-classes 8 data.train_crop=rrc "data.val_resize=$IMAGE" pipeline.strong_program=graph
! want cifar_step || run cifar_step step "${CIFAR_PAIR[@]}" --warmup 5
if want cifar_e2e; then
  py datasets_prep/make_cifar_like.py --out "$CIFAR" --train "$CIFAR_N" --test 1000 >/dev/null
  run cifar_e2e e2e --pipelines torch,gpu --data "$CIFAR" --dataset cifar100 "${CIFAR_PAIR[@]}" --warmup 5 \
    --workers "$CORES"
fi
exit "$status"
