#!/usr/bin/env bash
# Rehearse the GPU window on this CPU before one is lent: the window's calls (gpu_window/README.md), each from
# a fresh copy of the working tree (what a device call gets: tracked and untracked, not ignored files) with
# .gpu_kit/base and one DALI part, run by a Python 3.12 venv holding what the GPU image holds (PyTorch 2.11 /
# torchvision 0.26 with their CUDA 13 wheels, used on the CPU; numpy 2.5, numba, OpenCV, scikit-learn, six;
# no OmegaConf, DALI or FFCV), every stage --cpu-dry-run. It proves the kit's unpacking, DALI's `nvidia`
# namespace next to the CUDA wheels' one, and the project on the image's Python and PyTorch, none of which
# the suite's dry run (this machine's venv) covers.
#   python -m gpu_window.kit build .gpu_kit     # first, if .gpu_kit is missing
#   bash gpu_window/rehearsal.sh [DIR]         # DIR default /tmp/gpu_rehearsal; ~3 GB of wheels the first time
# Exit 0 when every call's stages passed; each call's output is in DIR/out_N, its log in DIR/call_N.log.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-/tmp/gpu_rehearsal}
KIT=$ROOT/.gpu_kit
PARTS=("$KIT"/parts/dali-site.tar.xz.*)
if [ ! -d "$KIT/base" ] || [ ! -f "${PARTS[0]}" ]; then
  echo "gpu_rehearsal: no kit at $KIT: run python -m gpu_window.kit build .gpu_kit" >&2
  exit 2
fi
if [ -z "${PY312:-}" ]; then  # the first that runs (a pyenv shim may exist and refuse to)
  for c in python3.12 /root/.pyenv/versions/3.12*/bin/python /usr/local/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$c; break; fi
  done
fi
if [ -z "${PY312:-}" ]; then
  echo "gpu_rehearsal: no Python 3.12 found (set PY312)" >&2
  exit 2
fi
mkdir -p "$DIR"
VENV=$DIR/venv312
if [ ! -x "$VENV/bin/python3" ] || ! "$VENV/bin/python3" -c 'import torch, torchvision, cv2, sklearn, six' 2>/dev/null; then
  "$PY312" -m venv "$VENV" && "$VENV/bin/pip" install -q --upgrade pip &&
  "$VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 pillow tqdm pyyaml matplotlib numba \
    opencv-python-headless scikit-learn tensorboard psutil six packaging || exit 1
fi
# each call: STAGES and BUDGET of the window plan (gpu_window/README.md); call N carries part N (the group stage goes last)
CALL_STAGES=("preflight correctness cifar r34" "strong" "dali group")
rm -rf "$DIR/work" "$DIR"/out_*
bad=0
for i in "${!PARTS[@]}"; do
  tree=$DIR/tree
  rm -rf "$tree" && mkdir -p "$tree" || exit 1
  (cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) |
    tar -xf - -C "$tree" || exit 1
  mkdir -p "$tree/.gpu_kit/parts" && cp -r "$KIT/base" "$tree/.gpu_kit/" && cp "${PARTS[$i]}" "$tree/.gpu_kit/parts/"
  stages=${CALL_STAGES[$i]:-group}
  echo "== call $i: $(basename "${PARTS[$i]}"), STAGES=\"$stages\""
  (cd "$tree" && env -u PYTHONPATH PATH="$VENV/bin:$PATH" PYTHON=python3 WORK="$DIR/work" OMP_NUM_THREADS=2 \
    CUDA_VISIBLE_DEVICES= KIT=.gpu_kit STAGES="$stages" BUDGET=2000 \
    bash gpu_window/run.sh "$DIR/out_$i" --cpu-dry-run > "$DIR/call_$i.log" 2>&1)
  rc=$?
  grep -h '^# gpu_kit' "$DIR/call_$i.log"
  sed -n '/^| stage /,/^$/p' "$DIR/out_$i/summary.md"
  [ "$rc" = 0 ] || { echo "   call $i exited $rc: $DIR/call_$i.log"; bad=1; }
done
grep -q '^| dali_loader | ok' "$DIR"/out_*/summary.md || { echo "gpu_rehearsal: DALI never ran" >&2; bad=1; }
exit $bad
