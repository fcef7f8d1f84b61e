"""Precompute the teacher's logits on exactly the views students will see (the teacher-logit cache).

    python cache_teacher.py --config configs/cifar100/crld/res32x4_res8x4.yaml \
        teacher.ckpt=checkpoints/resnet32x4.pth --epochs 240 --out caches/res32x4_c100
    python cache_teacher.py ... --epochs 300 --out caches/res32x4_c100     # extends it by 60 epochs
    python cache_teacher.py --config configs/imagenet/crld/r34_r18.yaml teacher.ckpt=... \
        --epochs 100 --topk 32 --out caches/r34_in1k                       # top-k for 1000 classes
    torchrun --nproc_per_node=8 cache_teacher.py ... --out caches/r34_in1k  # every GPU (and node) builds
    python cache_teacher.py --verify caches/r34_in1k                       # checksums, shapes, fingerprint
    python train.py --config ... teacher.source=cache teacher.cache=caches/res32x4_c100

The training config decides the views (seed, dataset, image size, crop, RandAugment) and the
backend that makes them; the teacher runs frozen under inference mode, `run.amp` and channels-last.
The work is cut into units (whole epochs, or blocks of batches when epochs are fewer than ranks), built
round-robin by the ranks, each written complete (temp + rename); an epoch's units are then assembled into
its folder with checksums, and meta.json is written last. The cache's size and the file system's free space
are printed before the teacher runs, and a cache that cannot fit is refused. After a kill, SIGTERM or
SIGUSR1 (the unit finishes, exit 75 and OUT/preempted.json, as train.py leaves), or with a larger --epochs,
the same command builds only what is missing.
Worth it when several students (seeds, sweeps) learn from one teacher; for a single run the online
teacher costs about the same as building the cache.
"""
from common.cpus import spin_briefly

spin_briefly()  # before torch loads OpenMP, which reads its settings once
import argparse
import os
import contextlib
import logging
import shutil
import sys
import time

import torch

from common.files import check_writable, human, writing
from pipelines import train_loader, val_loader
from pipelines.splits import open_split
from training.cache_build import BUILD_STATE, UnitBuilder, agree, build_lock, plan, prepare
from training.cache_units import UNITS, verify_cache
from training.checkpoint import CheckpointError
from training.cli import run_main
from training.config import ConfigError, load_config, to_yaml
from training.hub_weights import weights_path
from training.loop import evaluate, frozen_teacher
from training.preemption import Preempted, StopRequest, clear_preempted, mark_preempted
from training.runtime import (autocast_for, check_same_config, cpu_threads, dist_from_env, init_distributed,
                              resolve_device)
from training.teacher_cache import CacheError, epoch_dir, file_sha256, fingerprint, write_meta

log = logging.getLogger("cache_teacher")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the students' training config (YAML diff over the defaults)")
    ap.add_argument("--out", help="cache directory (created, or extended when it exists)")
    ap.add_argument("--verify", metavar="DIR", help="check the cache in DIR (checksums, shapes, fingerprint); "
                                                    "names the first bad file")
    ap.add_argument("--epochs", type=int, help="augmentation epochs to hold (default: optim.epochs)")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"), help="storage dtype")
    ap.add_argument("--topk", type=int, default=0, help="keep the k largest logits per view (0: all)")
    ap.add_argument("--pipeline", help="data backend making the views (default: pipeline.name)")
    ap.add_argument("--unit-batches", type=int, default=0,
                    help="batches per build unit (0: whole epochs, cut finer when epochs are fewer than ranks)")
    ap.add_argument("--overwrite", action="store_true", help="replace the cache in --out (another fingerprint)")
    ap.add_argument("--no-eval", action="store_true", help="skip the teacher's validation pass")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. teacher.ckpt=PATH")
    args = ap.parse_intermixed_args(argv)
    if not (args.out or args.verify):
        ap.error("one of --out (build) or --verify DIR is required")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.verify:
        r = verify_cache(args.verify)
        old = f"; epochs {r['unchecked']} have no checksums (shapes and sizes checked)" if r["unchecked"] else ""
        print(f"{args.verify}: ok, {r['epochs']} epochs, {human(r['bytes'])} checked{old}")
        return r
    over = list(args.overrides) + ([f"pipeline.name={args.pipeline}"] if args.pipeline else [])
    cfg = load_config(args.config, over + ["pipeline.drop_last=false", "teacher.source=online"])
    epochs = args.epochs or cfg.optim.epochs
    c = cfg.data.num_classes
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if not 0 <= args.topk < c:
        raise ConfigError(f"--topk must be in [0, {c - 1}] for {c} classes, got {args.topk}")
    if args.topk and cfg.method.logit_stand:
        raise ConfigError("--topk with method.logit_stand=true: standardisation needs every logit; "
                          "use a full cache (--topk 0)")
    if args.unit_batches < 0:
        raise ConfigError(f"--unit-batches must be >= 0, got {args.unit_batches}")
    if not cfg.teacher.ckpt:
        raise CheckpointError("teacher.ckpt is required to build a teacher cache")
    check_writable(args.out)  # before the data and the teacher's checksum
    dist = dist_from_env()
    device = resolve_device(cfg.run.device, dist)
    with cpu_threads(cfg, device) as cpus:  # the split train.py applies, before any thread pool starts
        return fill(args, cfg, epochs, dist, device, cpus)


def fill(args, cfg, epochs, dist, device, cpus):
    """The cache in --out made to hold `epochs` epochs, built by every rank (on the CPU threads `cpus`)."""
    c = cfg.data.num_classes
    init_distributed(dist, device, cfg.run.dist_timeout_s)
    try:
        check_same_config(to_yaml(cfg) + repr(sorted(vars(args).items())), dist)
        src = open_split(cfg, train=True)
        sha = file_sha256(weights_path(cfg.teacher.ckpt, cfg.teacher.name))
        fp = fingerprint(cfg, src, precision=args.precision, topk=args.topk, teacher_sha=sha, device=device)
        with contextlib.ExitStack() as held:
            if dist.is_main:
                with writing(args.out):
                    os.makedirs(args.out, exist_ok=True)
            meta = agree(dist, lambda: (held.enter_context(build_lock(args.out)),
                                        prepare(args.out, fp, args.overwrite, len(src), c))[1])
            if dist.is_main:
                log.info(cpus.line())
                clear_preempted(args.out)
            try:
                return build(args, cfg, src, meta, epochs, dist, device)
            except Preempted as e:  # the job script's test under torchrun, which reports exit 75 as a failure
                if dist.is_main:
                    mark_preempted(args.out, str(e), resume="the same cache_teacher.py command")
                raise
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def build(args, cfg, src, meta, epochs, dist, device):
    c = cfg.data.num_classes
    if meta["epochs"] >= epochs:
        if dist.is_main:
            os.remove(os.path.join(args.out, BUILD_STATE))
            print(f"{args.out}: already holds {meta['epochs']} epochs (>= {epochs}); nothing to do")
        return meta
    whole = cfg.pipeline.name == "ffcv"  # FFCV's own shuffle: a block of batches is not a block of rows
    batches = -(-len(src) // cfg.pipeline.batch_size)
    work = agree(dist, lambda: plan(args.out, meta, epochs, cfg.pipeline.batch_size, dist.world,
                                    batches if whole else args.unit_batches, args.precision, args.topk))
    teacher = frozen_teacher(cfg, device)
    autocast, _, _ = autocast_for(cfg.run.amp, device)
    if dist.is_main and not args.no_eval and "teacher_val_top1" not in meta:
        val = val_loader(cfg, device, train_classes=src.classes)[0]
        meta["teacher_val_top1"] = evaluate([teacher], val, device, autocast)[0]["val_top1"]
        log.info("teacher %s: val top-1 %.2f", cfg.teacher.name, meta["teacher_val_top1"])
    loader = train_loader(cfg, device, src, 0, 1, views=2)

    def forward(b):
        with torch.inference_mode(), autocast():
            t = teacher(torch.cat([b.weak, b.strong]))
        return torch.stack(t.float().chunk(2), 1).cpu()  # (B, 2, C), weak first

    stop = StopRequest().install()
    t_start = time.perf_counter()
    try:
        rates = UnitBuilder(args.out, dist, device, loader, forward, args, cfg, stop).run(work, c)
    finally:
        stop.uninstall()
    wall = time.perf_counter() - t_start
    built = sum(u.rows[1] - u.rows[0] for u in work["todo"])
    if dist.is_main:
        gone = [e for e in range(epochs) if not os.path.isdir(epoch_dir(args.out, e))]
        if gone:
            raise CacheError(f"{args.out}: epochs {gone} are missing after the build; run the same command again")
        first = meta["epochs"]
        meta.update(epochs=epochs, epoch_bytes=work["epoch_bytes"])
        meta["builds"].append({"epochs": [first, epochs], "seconds": round(wall, 2), "device": str(device),
                               "pipeline": cfg.pipeline.name, "amp": cfg.run.amp, "world": dist.world,
                               "units": len(work["todo"]), "samples_per_s": round(built / wall, 1),
                               "per_rank_samples_per_s": [round(r, 1) for r in rates]})
        write_meta(args.out, meta)
        os.remove(os.path.join(args.out, BUILD_STATE))
        shutil.rmtree(os.path.join(args.out, UNITS), ignore_errors=True)
        print(f"{args.out}: {epochs} epochs x {len(src)} samples x 2 views; built {len(work['todo'])} units on "
              f"{dist.world} rank(s), {built / wall:.0f} samples/s (per rank: "
              f"{', '.join(f'{r:.0f}' for r in rates)}), {human(work['epoch_bytes'])} per epoch")
    return meta


if __name__ == "__main__":
    sys.exit(run_main(main))
