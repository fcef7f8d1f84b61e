#!/usr/bin/env bash
# DALI on a GPU: the loader benchmark (`torch` vs `dali` with nvJPEG `mixed` decoding, plus `dali` in CPU
# mode on the same cores) and end to end (ResNet34 -> ResNet18 at 224, online teacher and cache, against
# the reference) on N ImageNet-like JPEGs (500x375, quality 90), into OUT_DIR/{env.txt,*.json,*.txt}.
#   bash scripts/gpu_dali.sh OUT_DIR [N_IMAGES]        # default 3200 images
#   DALI_SITE=/tmp/site bash scripts/gpu_dali.sh OUT   # DALI's packages unpacked into a folder, not installed
#   DEVICE=cpu BATCH=16 STEPS=2 IMAGE=64 bash scripts/gpu_dali.sh OUT 64   # a dry run of the code paths
#   STAGES="loader e2e" bash scripts/gpu_dali.sh OUT      # a subset of: loader dali_cpu e2e
# Stops at 9 minutes; each stage's figures are written when it ends.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_dali.sh OUT_DIR [N_IMAGES]" >&2
  exit 2
fi
OUT=$1
N=${2:-3200}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
IMAGE=${IMAGE:-224}
DATA=${DATA:-/tmp/jpeg_gpu_dali}
CORES=$(nproc)
STAGES=" ${STAGES:-loader dali_cpu e2e} "
if [ -n "${DALI_SITE:-}" ]; then
  export DALI_SITE PYTHONPATH="$DALI_SITE${PYTHONPATH:+:$PYTHONPATH}"
  export LD_LIBRARY_PATH="$DALI_SITE/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
END=$((SECONDS + 540))

py() {  # DALI_SITE's `nvidia` folder joins an installed `nvidia` package (CUDA wheels ship one)
  local left=$((END - SECONDS))
  [ "$left" -gt 5 ] || { echo "gpu_dali: out of time before: $*" >&2; return 124; }
  timeout -k 10 "$left" "$PY" - "$@" <<'EOF'
import os, runpy, sys
site = os.environ.get("DALI_SITE")
if site:
    import nvidia
    if os.path.join(site, "nvidia") not in list(nvidia.__path__):
        nvidia.__path__.append(os.path.join(site, "nvidia"))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
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
[ -d "$DATA/train" ] || py datasets_prep/make_jpeg_folder.py --out "$DATA" --train "$N" --val 16 --classes 8
! want loader || py bench.py loader --pipelines torch,dali --data "$DATA" --image-size "$IMAGE" \
  --batch-size "$BATCH" --batches "$STEPS" --warmup 3 --repeat 3 --workers "$CORES" --device "$DEVICE" \
  --json "$OUT/loader_mixed.json" 2>&1 | tee "$OUT/loader_mixed.txt" || status=$?
! want dali_cpu || py bench.py loader --pipelines dali --data "$DATA" --image-size "$IMAGE" --batch-size "$BATCH" \
  --batches "$STEPS" --warmup 3 --repeat 1 --workers "$CORES" --device "$DEVICE" --json "$OUT/loader_dali_cpu.json" \
  pipeline.dali_device=cpu 2>&1 | tee "$OUT/loader_dali_cpu.txt" || status=$?
! want e2e || py bench.py e2e --pipelines torch,dali --data "$DATA" --dataset imagefolder --teacher imagenet_resnet34 \
  --student imagenet_resnet18 --image-size "$IMAGE" --batch-size "$BATCH" --steps "$STEPS" --warmup 5 \
  --teacher-source online,cache --workers "$CORES" --device "$DEVICE" --json "$OUT/e2e.json" \
  data.train_crop=rrc "data.val_resize=$IMAGE" 2>&1 | tee "$OUT/e2e.txt" || status=$?
exit "$status"
