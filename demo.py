"""The embedded demo: real data, no downloads, no weights, CPU-friendly.

    python demo.py                    # full demo (its time on the 2-core machine: docs/benchmarks.md)
    python demo.py --pipeline dali    # any backend; ffcv converts the demo set to .beton first
    python demo.py --quick            # smoke version used by the tests

Materialises scikit-learn's digits as 32x32 RGB images, trains a resnet20 teacher with CE (12 epochs), then
trains the same resnet8 student with CE, KD and CRLD from that teacher as one group run (configs/demo/study.yaml:
one data and teacher pass for the three; 10 epochs; --seeds N repeats the group) and prints top-1 on the
held-out split (mean over seeds). A smoke demonstration, not the paper's benchmark.
--quick: one epoch, one seed, on a 256-image training subset with every backend (data.subset=256; ffcv, which
reads whole .beton files, converts a copy of the demo set holding that subset, in DATA/subset256).
"""
from common.cpus import spin_briefly

spin_briefly()  # before torch loads OpenMP, which reads its settings once
import argparse
import os
import json
import statistics
import sys
import time

import report
from common.files import save_atomic
import train
from datasets_prep.make_demo import make_demo, make_demo_subset
from datasets_prep.prep_ffcv import main as prep
from pipelines import available_pipelines
from training.cli import run_main

QUICK_SUBSET = 256  # training images in --quick mode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny subset, 1 epoch, 1 seed")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10, help="student epochs (the teacher trains 2 more)")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--data", default="data/demo")
    # torch: for 1,797 32x32 images the reference loader is the lightest (no DALI pipeline built per run)
    ap.add_argument("--pipeline", default="torch", choices=available_pipelines(), help="data backend")
    args = ap.parse_args(argv)
    data = make_demo(args.data)
    if args.pipeline == "ffcv":  # convert once; later runs find complete .beton files and skip
        if args.quick:  # the ffcv backend refuses data.subset: it converts a copy holding the subset
            data = make_demo_subset(args.data, os.path.join(args.data, f"subset{QUICK_SUBSET}"), QUICK_SUBSET)
        for split, name in (("train", "train"), ("test", "val")):
            prep(["--format", "demo", "--src", data, "--split", split,
                  "--out", os.path.join(data, "ffcv", f"{name}.beton")])
    common = [f"data.root={data}", f"run.out_dir={args.out}", f"pipeline.name={args.pipeline}",
              "run.progress=false"]
    if args.pipeline == "torch":  # on 2 cores, worker processes slow the compute threads more than they help
        common.append("pipeline.num_workers=0")
    seeds = 1 if args.quick else args.seeds
    epochs = 1 if args.quick else args.epochs
    if args.quick:
        common += [] if args.pipeline == "ffcv" else [f"data.subset={QUICK_SUBSET}"]
        common += [ "pipeline.val_batch_size=128", "optim.warmup_epochs=0"]
    common.append(f"optim.epochs={epochs}")
    t0 = time.time()
    teacher = train.main(["--config", "configs/demo/teacher.yaml", "--overwrite", "run.name=teacher",
                          "optim.epochs=%d" % (epochs if args.quick else epochs + 2)] + common[:-1])
    ckpt = os.path.join(args.out, "teacher", "best.pt")
    results = {m: [] for m in ("ce", "kd", "crld")}
    for seed in range(seeds):  # the three students as one group: one data pass, one teacher pass
        group = train.main(["--config", "configs/demo/study.yaml", "--overwrite", f"run.name=students_seed{seed}",
                            f"run.seed={seed}", f"teacher.ckpt={ckpt}"] + common)
        for s in group:
            results[s["method"]].append(s["best_top1"])
    rows = [("teacher resnet20 (ce)", [teacher["best_top1"]])]
    rows += [(f"student resnet8 ({m})", v) for m, v in results.items()]
    lines = ["", f"Demo: sklearn digits 32x32 RGB, pipeline {args.pipeline}, {seeds} seed(s), {epochs} epochs, "
             f"{time.time() - t0:.0f}s on this machine", "",
             "| model (method) | best top-1 (mean) | per seed |", "|---|---|---|"]
    for name, v in rows:
        lines.append(f"| {name} | {statistics.mean(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    print("\n".join(lines))
    table = os.path.join(args.out, "demo_table.json")
    doc = {"teacher": teacher["best_top1"], **results, "seeds": seeds, "epochs": epochs}
    save_atomic(table, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    runs = [os.path.join(args.out, n) for n in ["teacher"] + [f"students_seed{s}" for s in range(seeds)]]
    report.main([*runs, "--out", os.path.join(args.out, "report"), "--title", "demo: digits 32x32, resnet8 student"])
    return results


if __name__ == "__main__":
    sys.exit(run_main(main))
