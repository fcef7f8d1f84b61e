# CUDA check of the training paths on the demo: online teacher, teacher cache (built on CUDA), run.compile.
set -x
export PYTHONUNBUFFERED=1
python3 -c "from datasets_prep.make_demo import make_demo; make_demo('data/demo')"
C="data.root=data/demo pipeline.name=torch run.progress=false run.out_dir=runs/g"
T=runs/g/teacher/best.pt
python3 train.py --config configs/demo/teacher.yaml --overwrite run.name=teacher optim.epochs=20 $C 2>&1 | tail -2
time python3 cache_teacher.py --config configs/demo/crld.yaml teacher.ckpt=$T $C --epochs 15 --out runs/g/cache 2>&1 | tail -4
for mode in online cache compile; do
  X=""; [ $mode = cache ] && X="teacher.source=cache teacher.cache=runs/g/cache"; [ $mode = compile ] && X="run.compile=true"
  (time python3 train.py --config configs/demo/crld.yaml --overwrite run.name=crld_$mode teacher.ckpt=$T $X $C) 2>&1 | grep -v -i warn | tail -4
  cp runs/g/crld_$mode/metrics.jsonl $OUT/metrics_$mode.jsonl
done
cp runs/g/teacher/metrics.jsonl $OUT/metrics_teacher.jsonl; cp runs/g/cache/meta.json $OUT/cache_meta.json
