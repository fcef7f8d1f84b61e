"""`python -m bench cache`: how fast the teacher cache builds, samples/s per rank and aggregate.

    python -m bench cache --teacher resnet32x4 --epochs 2 --batch-size 64 --device cpu     # demo data, 32 px
    torchrun --nproc_per_node=8 -m bench cache --teacher imagenet_resnet34 --data /data/imagenet \
        --dataset imagenet --image-size 224 --batch-size 256 --topk 32 --epochs 1 --pipelines dali

Runs `cache_teacher.py` itself (a random teacher, --overwrite, no validation pass) into --cache-dir, which
every rank must see (a shared file system between nodes), and reports its build record: units, seconds,
aggregate samples/s and each rank's. The record is measured by the build, so the bench adds nothing to it.
"""
from __future__ import annotations

import os
import shutil

import cache_teacher
from bench.records import machine, save_json
from bench.step_e2e import data_overrides, random_teacher_ckpt
from training.runtime import dist_from_env


def shared_teacher(name, num_classes, folder, rank):
    """One random checkpoint at one path for every rank: each writes its own copy, then renames it into place."""
    path = os.path.join(folder, f"{name}_{num_classes}_random.pt")
    if not os.path.exists(path):
        mine = random_teacher_ckpt(name, num_classes, os.path.join(folder, f".rank{rank}"))
        os.replace(mine, path)
    return path


def run_cache_bench(args):
    dist = dist_from_env()
    if args.dataset == "demo" and not os.path.exists(os.path.join(args.data, "meta.json")):
        from datasets_prep.make_demo import make_demo  # scikit-learn: slow to import, this path only
        make_demo(args.data)
    os.makedirs(os.path.join(args.cache_dir, f".rank{dist.rank}"), exist_ok=True)
    num_classes = args.num_classes or (10 if args.dataset == "demo" else 0)
    ckpt = shared_teacher(args.teacher, num_classes, args.cache_dir, dist.rank)
    pipeline = args.pipelines.split(",")[0]
    amp = (args.amp or ("bf16" if args.device.startswith("cuda") else "off")).split(",")[0]
    over = [f"teacher.name={args.teacher}", f"teacher.ckpt={ckpt}", f"data.image_size={args.image_size}",
            f"pipeline.batch_size={args.batch_size}", f"run.amp={amp}", "run.progress=false",
            f"run.device={args.device.split(':')[0]}", *([f"data.num_classes={num_classes}"] if num_classes else [])]
    out = os.path.join(args.cache_dir, "cache")
    meta = cache_teacher.main(["--out", out, "--epochs", str(args.epochs), "--precision", args.precision,
                               "--topk", str(args.topk), "--no-eval", "--overwrite", *over,
                               *data_overrides(args, pipeline)])
    if not dist.is_main:
        return None
    rec = {**meta["builds"][-1], "teacher": args.teacher, "topk": args.topk, "precision": args.precision,
           "num_samples": meta["num_samples"], "epoch_bytes": meta["epoch_bytes"], "batch_size": args.batch_size,
           "image_size": args.image_size, "machine": machine()}
    print(f"cache build: {rec['world']} rank(s), {rec['samples_per_s']:.0f} samples/s aggregate, per rank "
          f"{rec['per_rank_samples_per_s']}, {rec['units']} units in {rec['seconds']:.1f} s")
    shutil.rmtree(out, ignore_errors=True)
    if args.json:
        save_json(args.json, [rec])
    return [rec]
