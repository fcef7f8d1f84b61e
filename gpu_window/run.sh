#!/usr/bin/env bash
# The GPU window in one script: every stage fail-soft under its own time limit, its log (figures, tracebacks)
# and JSON written to OUT_DIR when it ends, a summary table (OUT_DIR/summary.md) at the end. Stages, most
# decisive first:
#   preflight    GPU, versions, every import in a fresh interpreter (DALI when present), bf16 matmul rate
#   correctness  `pytest -m "cuda and not dali"` (tests/cuda/): the accelerator route against the CPU's (CRLD
#                steps under autocast, the augmenter, the graph strong program, the `gpu` route, the prefetcher,
#                one training epoch per backend)
#   cifar        resnet32x4 -> resnet8x4 at 32: step mode, then end to end through `gpu` (online and cache)
#   r34          ResNet34 -> ResNet18 at 224: step mode (online and cache), end to end through `torch`
#   dali         (DALI present) `pytest -m "cuda and dali"`: its decode on the GPU against the `torch` reference
#                and one training epoch; the `dali` loader alone vs `torch`, `dali` end to end
#   strong       both strong-view programs on the same crops (pipeline.strong_program)
#   group        K = 1, 2, 4 ResNet18 students from one data pass (train.py --student) with the cache, through
#                `dali` when present (else `torch`): student-samples/s against K solo runs, peak memory per K
# e2e/step ratios per configuration land in the summary (gpu_window/summary.py).
#   bash gpu_window/run.sh OUT_DIR                          # all stages
#   STAGES="dali strong" bash gpu_window/run.sh OUT_DIR     # a subset
#   KIT=.gpu_kit bash gpu_window/run.sh OUT_DIR             # first install the device kit's wheels and gather
#                                                           # its DALI parts (gpu_window/kit.py, README.md here)
#   bash gpu_window/run.sh OUT_DIR --cpu-dry-run            # every stage's code path on a CPU, tiny sizes
# Sizes: BATCH (256), STEPS (20 timed), WARMUP (5), N_JPEG (8000: the timed e2e steps cross no epoch boundary),
# CIFAR_N (50000); BUDGET (seconds, default 540) stops starting stages that cannot finish in time;
# NO_LIMITS=1 lifts the budget and every stage's time limit (the tests' dry runs).
# Exit 0: every stage ran and passed; 1: a stage failed or timed out (see the summary); 2: usage.
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash gpu_window/run.sh OUT_DIR [--cpu-dry-run]" >&2
  exit 2
fi
OUT=$1
DRY=${2:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
START=$SECONDS
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/gpu_run_work}
mkdir -p "$WORK"

if [ "$DRY" = --cpu-dry-run ]; then
  DEVICE=cpu BATCH=${BATCH:-4} STEPS=${STEPS:-2} WARMUP=${WARMUP:-1} IMAGE=${IMAGE:-32} N_JPEG=${N_JPEG:-48}
  CIFAR_N=${CIFAR_N:-64} CHECK_ARGS=--cpu-dry-run STRONG_SIZE=32 AMP=off
  export CRLD_CUDA_CHECKS_ON=cpu  # tests/cuda on the CPU at tiny sizes
  # the smallest models of each zoo: the dry run proves code paths, its rates mean nothing
  CIFAR_MODELS=${CIFAR_MODELS:-"resnet8 resnet8"} R34_MODELS=${R34_MODELS:-"imagenet_resnet18 imagenet_resnet18"}
elif [ -n "$DRY" ]; then
  echo "run.sh: unknown option $DRY" >&2
  exit 2
fi
DEVICE=${DEVICE:-cuda} BATCH=${BATCH:-256} STEPS=${STEPS:-20} WARMUP=${WARMUP:-5} IMAGE=${IMAGE:-224}
N_JPEG=${N_JPEG:-8000} CIFAR_N=${CIFAR_N:-50000} CHECK_ARGS=${CHECK_ARGS:-} STRONG_SIZE=${STRONG_SIZE:-224}
AMP=${AMP:-bf16} BUDGET=${BUDGET:-540}
read -r CIFAR_T CIFAR_S <<< "${CIFAR_MODELS:-resnet32x4 resnet8x4}"
read -r R34_T R34_S <<< "${R34_MODELS:-imagenet_resnet34 imagenet_resnet18}"
STAGES=" ${STAGES:-preflight correctness cifar r34 dali strong group} "
CORES=$(nproc)
STATUS="$OUT/stages.tsv"
[ -f "$STATUS" ] || printf 'stage\tstatus\tseconds\n' > "$STATUS"

if [ -n "${KIT:-}" ]; then  # the device kit: base wheels always, DALI once all its parts have travelled
  if kit_env=$("$PYTHON" -m gpu_window.kit unpack "$KIT" "$WORK/kit" --env 2> "$OUT/kit.log"); then
    eval "$kit_env"
    echo "$kit_env" | tail -1 | tee -a "$OUT/kit.log"
  else
    echo "run.sh: device kit not unpacked: $(tail -1 "$OUT/kit.log")" >&2
  fi
fi
has_dali() { "$PYTHON" -c 'import nvidia.dali' >/dev/null 2>&1; }

# stage NAME LIMIT CMD...: CMD under LIMIT seconds (less if the budget is short), output into OUT/NAME.log
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ -n "${NO_LIMITS:-}" ]; then  # the tests' dry run: a slow or loaded machine must not fail a stage
    limit=0                         # (timeout 0: none)
  elif [ "$left" -lt 20 ]; then
    printf '%s\tskipped: budget spent\t0\n' "$name" >> "$STATUS"
    return
  fi
  [ "$limit" -le "$left" ] || [ "$limit" = 0 ] || limit=$left
  echo "== $name (limit ${limit} s, $(date -u +%H:%M:%S))"
  local t0=$SECONDS rc=0
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  local res=ok
  [ "$rc" = 0 ] || res="failed (exit $rc)"
  [ "$rc" = 124 ] && res="timed out after ${limit} s"
  printf '%s\t%s\t%s\n' "$name" "$res" "$((SECONDS - t0))" >> "$STATUS"
  echo "   $res in $((SECONDS - t0)) s; last lines:"
  tail -n 4 "$OUT/$name.log" | cut -c1-240 | sed 's/^/   | /'
}
want() { [[ $STAGES == *" $1 "* ]]; }
BENCH=("$PYTHON" -m bench)
# every stage's model pair at the run's sizes; the step and e2e runs of a pair share them, so ratios compare
CIFAR_PAIR=(--teacher "$CIFAR_T" --student "$CIFAR_S" --image-size 32 --batch-size "$BATCH" --steps "$STEPS"
            --warmup "$WARMUP" --amp "$AMP" --teacher-source online,cache --device "$DEVICE")
R34=(--teacher "$R34_T" --student "$R34_S" --num-classes 8 --image-size "$IMAGE"
     --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --amp "$AMP" --teacher-source online,cache
     --device "$DEVICE")
JPEG=$WORK/jpeg_$N_JPEG
CIFAR=$WORK/cifar_$CIFAR_N
E2E_JPEG=(--data "$JPEG" --dataset imagefolder --workers "$CORES" data.train_crop=rrc "data.val_resize=$IMAGE")

# tests/cuda's checks: one JSON record each in OUT/<stage>.json (CRLD_CHECKS_REPORT), read by the summary
CHECKS=("$PYTHON" -m pytest -q -p no:cacheprovider -rfE --tb=short tests/cuda)
want preflight && stage preflight 120 "$PYTHON" -m gpu_window.preflight "$OUT/preflight" $CHECK_ARGS
want correctness && stage correctness 300 env CRLD_CHECKS_REPORT="$OUT/correctness.json" "${CHECKS[@]}" \
  -m "cuda and not dali" --basetemp "$WORK/correctness"
if want cifar; then
  stage cifar_data 60 "$PYTHON" datasets_prep/make_cifar_like.py --out "$CIFAR" --train "$CIFAR_N" --test 1000
  stage cifar_step 90 "${BENCH[@]}" step "${CIFAR_PAIR[@]}" --json "$OUT/cifar_step.json"
  stage cifar_e2e 150 "${BENCH[@]}" e2e --pipelines gpu --data "$CIFAR" --dataset cifar100 --workers "$CORES" \
    "${CIFAR_PAIR[@]}" --profile "$OUT/prof" --json "$OUT/cifar_e2e.json"
fi
if want r34 || want dali; then
  stage jpeg_data 90 "$PYTHON" datasets_prep/make_jpeg_folder.py --out "$JPEG" --train "$N_JPEG" --val 64 \
    --classes 8 --unique 512
fi
# the step rate in every command that measures a ResNet34 e2e rate: its goal is e2e / step on the same card in
# the same command, and a window runs `r34` and `dali` in different calls
if want r34 || { want dali && has_dali; }; then
  stage r34_step 120 "${BENCH[@]}" step "${R34[@]}" --json "$OUT/r34_step.json"
fi
if want r34; then
  stage r34_e2e_torch 150 "${BENCH[@]}" e2e --pipelines torch "${E2E_JPEG[@]}" "${R34[@]}" --profile "$OUT/prof" --json "$OUT/r34_e2e_torch.json"
fi
if want dali; then
  if has_dali; then
    stage dali_check 150 env CRLD_CHECKS_REPORT="$OUT/dali_check.json" "${CHECKS[@]}" -m "cuda and dali" \
      --basetemp "$WORK/dali_check"
    stage dali_loader 120 "${BENCH[@]}" loader --device "$DEVICE" --pipelines torch,dali --data "$JPEG" --image-size "$IMAGE" \
      --batch-size "$BATCH" --batches "$STEPS" --warmup 3 --workers "$CORES" --json "$OUT/dali_loader.json"
    stage r34_e2e_dali 180 "${BENCH[@]}" e2e --pipelines dali --no-reference "${E2E_JPEG[@]}" "${R34[@]}" \
      --profile "$OUT/prof" --json "$OUT/r34_e2e_dali.json"
  else
    printf 'dali\tskipped: nvidia.dali does not import (KIT parts missing?)\t0\n' >> "$STATUS"
  fi
fi
want strong && stage strong 120 "$PYTHON" -m bench.strong_programs --device "$DEVICE" --batch-size "$BATCH" \
  --size "$STRONG_SIZE" --batches "$STEPS" --json "$OUT/strong_programs.json"
if want group; then
  [ -d "$JPEG" ] || stage jpeg_data 90 "$PYTHON" datasets_prep/make_jpeg_folder.py --out "$JPEG" --train "$N_JPEG" \
    --val 64 --classes 8 --unique 512
  GROUP_PIPE=$(has_dali && echo dali || echo torch)
  stage group 240 "${BENCH[@]}" e2e --pipelines "$GROUP_PIPE" --no-reference "${E2E_JPEG[@]}" "${R34[@]}" \
    --teacher-source cache --students 1,2,4 --json "$OUT/group_e2e.json"
fi

"$PYTHON" -m gpu_window.summary "$OUT" > "$OUT/summary.md" 2> "$OUT/summary.log" || cat "$OUT/summary.log" >&2
cat "$OUT/summary.md"
if awk -F'\t' 'NR > 1 && $2 != "ok" && $2 !~ /^skipped/ {bad = 1} END {exit !bad}' "$STATUS"; then
  exit 1
fi
exit 0
