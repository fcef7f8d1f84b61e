"""Precompute the teacher's logits on exactly the views students will see (the teacher-logit cache).

    python cache_teacher.py --config configs/cifar100/crld/res32x4_res8x4.yaml \
        teacher.ckpt=checkpoints/resnet32x4.pth --epochs 240 --out caches/res32x4_c100
    python cache_teacher.py ... --epochs 300 --out caches/res32x4_c100     # extends it by 60 epochs
    python cache_teacher.py --config configs/imagenet/crld/r34_r18.yaml teacher.ckpt=... \
        --epochs 100 --topk 32 --out caches/r34_in1k                       # top-k for 1000 classes
    python train.py --config ... teacher.source=cache teacher.cache=caches/res32x4_c100

The training config decides the views (seed, dataset, image size, crop, RandAugment) and the
backend that makes them; the teacher runs frozen under inference mode, `run.amp` and channels-last.
Each epoch is written to a temp directory and renamed when complete; meta.json is updated last.
Worth it when several students (seeds, sweeps) learn from one teacher; for a single run the online
teacher costs about the same as building the cache.
"""
import argparse
import contextlib
import logging
import os
import re
import shutil
import sys
import time

import torch

from pipelines import get_backend
from pipelines.device import on_device
from pipelines.splits import open_split
from training.checkpoint import CheckpointError
from training.cli import run_main
from training.config import ConfigError, load_config
from training.hub_weights import weights_path
from training.loop import evaluate, frozen_teacher
from training.runtime import autocast_for, dist_from_env, resolve_device
from training.teacher_cache import (CacheError, EpochWriter, compare_fingerprints, epoch_bytes, file_sha256,
                                    fingerprint, read_meta, write_meta)

log = logging.getLogger("cache_teacher")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the students' training config (YAML diff over the defaults)")
    ap.add_argument("--out", required=True, help="cache directory (created, or extended when it exists)")
    ap.add_argument("--epochs", type=int, help="augmentation epochs to hold (default: optim.epochs)")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"), help="storage dtype")
    ap.add_argument("--topk", type=int, default=0, help="keep the k largest logits per view (0: all)")
    ap.add_argument("--pipeline", help="data backend making the views (default: pipeline.name)")
    ap.add_argument("--overwrite", action="store_true", help="replace the cache in --out (another fingerprint)")
    ap.add_argument("--no-eval", action="store_true", help="skip the teacher's validation pass")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. teacher.ckpt=PATH")
    return ap.parse_intermixed_args(argv)


def main(argv=None):
    args = parse_args(argv)
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
    if not cfg.teacher.ckpt:
        raise CheckpointError("teacher.ckpt is required to build a teacher cache")
    if dist_from_env().world > 1:
        raise ConfigError("cache_teacher.py runs as one process (ranks would race on the same --out); "
                          "launch it with python, not torchrun")
    device = resolve_device(cfg.run.device, dist_from_env())
    src = open_split(cfg, train=True)
    sha = file_sha256(weights_path(cfg.teacher.ckpt, cfg.teacher.name))
    fp = fingerprint(cfg, src, precision=args.precision, topk=args.topk, teacher_sha=sha, device=device)
    os.makedirs(args.out, exist_ok=True)
    with build_lock(args.out):
        return build(args, cfg, src, fp, device)


def _is_cache_entry(name: str) -> bool:
    return name == "meta.json" or name.startswith(".") or re.fullmatch(r"epoch_\d{4}", name) is not None


@contextlib.contextmanager
def build_lock(out: str):
    """One builder per cache directory: a second one (or a stale lock of a live process) is refused."""
    lock = os.path.join(out, ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(open(lock).read().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, OSError):
                os.remove(lock)  # left by a killed build
                continue
            raise CacheError(f"{out}: another cache_teacher.py (pid {pid}) is building this cache") from None
    else:
        raise CacheError(f"{out}: cannot take the build lock {lock}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        if os.path.exists(lock):
            os.remove(lock)


def build(args, cfg, src, fp, device):
    epochs, c = args.epochs or cfg.optim.epochs, cfg.data.num_classes
    meta = read_meta(args.out)
    if meta is None or args.overwrite:
        odd = [n for n in os.listdir(args.out) if not _is_cache_entry(n)]
        if odd:
            raise CacheError(f"{args.out}: exists and is not a teacher cache (holds {odd[0]}); choose another --out")
        for name in os.listdir(args.out):  # a replaced cache, or epochs of a build killed before meta.json
            if name != ".lock":
                path = os.path.join(args.out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        meta = None
    if meta is not None:
        compare_fingerprints(args.out, meta.get("fingerprint"), fp)
        if meta["epochs"] >= epochs:
            print(f"{args.out}: already holds {meta['epochs']} epochs (>= {epochs}); nothing to do")
            return meta
    else:
        meta = {"fingerprint": fp, "epochs": 0, "num_samples": len(src), "num_classes": c, "builds": []}
    for name in os.listdir(args.out):  # temp epochs of a killed build
        if name.startswith(".epoch_"):
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)

    teacher = frozen_teacher(cfg, device)
    autocast, _, _ = autocast_for(cfg.run.amp, device)
    backend, route = get_backend(cfg.pipeline.name), on_device(cfg, device)
    if not args.no_eval and "teacher_val_top1" not in meta:
        val_src = open_split(cfg, train=False, train_classes=src.classes)
        val = backend.build_val(val_src, cfg, device, device_route=route)
        meta["teacher_val_top1"] = evaluate([teacher], val, device, autocast)[0]["val_top1"]
        log.info("teacher %s: val top-1 %.2f", cfg.teacher.name, meta["teacher_val_top1"])
    loader = backend.build_train(src, cfg, device, 0, 1, views=2, device_route=route)
    per_epoch = epoch_bytes(len(src), c, args.precision, args.topk)
    first = meta["epochs"]
    t_start = time.perf_counter()
    for e in range(first, epochs):
        free = shutil.disk_usage(args.out).free
        if free < per_epoch + (64 << 20):
            raise CacheError(f"{args.out}: not enough disk space for epoch {e} ({per_epoch / 2**20:.0f} MiB "
                             f"needed, {free / 2**20:.0f} MiB free); {e} complete epochs kept")
        writer = EpochWriter(args.out, e, len(src), c, args.precision, args.topk, cfg.method.temperature,
                             cfg.run.seed)
        try:
            loader.set_epoch(e)
            t0 = time.perf_counter()
            for b in loader:
                with torch.inference_mode(), autocast():
                    t = teacher(torch.cat([b.weak, b.strong]))
                t = torch.stack(t.float().chunk(2), 1).cpu()  # (B, 2, C), weak first
                writer.write(b.index.cpu().numpy(), t)
            writer.commit()
        except OSError as err:
            writer.abort()
            raise CacheError(f"{args.out}: writing epoch {e} failed ({err.strerror or err}); temp files removed, "
                             f"{e} complete epochs kept") from None
        except BaseException:
            writer.abort()
            raise
        dt = time.perf_counter() - t0
        meta["epochs"] = e + 1
        meta["epoch_bytes"] = per_epoch
        write_meta(args.out, meta)
        print(f"epoch {e + 1}/{epochs}: {len(src) / dt:.0f} samples/s, {per_epoch / 2**20:.1f} MiB")
    wall = time.perf_counter() - t_start
    meta["builds"].append({"epochs": [first, epochs], "seconds": round(wall, 2), "device": str(device),
                           "pipeline": cfg.pipeline.name, "amp": cfg.run.amp,
                           "samples_per_s": round(len(src) * (epochs - first) / wall, 1)})
    write_meta(args.out, meta)
    print(f"{args.out}: {epochs} epochs x {len(src)} samples x 2 views, "
          f"{len(src) * (epochs - first) / wall:.0f} samples/s, {per_epoch / 2**20:.1f} MiB per epoch")
    return meta


if __name__ == "__main__":
    sys.exit(run_main(main))
