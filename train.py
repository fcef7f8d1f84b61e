"""Train a student (or a teacher, with method ce) with CE, KD, DKD or CRLD.

    python train.py --config configs/cifar100/crld/res32x4_res8x4.yaml \
        teacher.ckpt=checkpoints/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth optim.lr=0.05
    python train.py --config configs/demo/crld.yaml --resume          # continue runs/<name>/last.pt
    torchrun --nproc_per_node=8 train.py --config ...                 # one process per GPU (gloo on CPU)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py --config ...              # multi-node (same on each node)
    python train.py --config ... teacher.source=cache teacher.cache=caches/X   # see cache_teacher.py

Writes runs/<run.name>/: config.yaml (resolved), run_info.json (git commit, argv, versions),
metrics.jsonl (one line per epoch), best.pt / last.pt (atomic), summary.json.
"""
import argparse
import logging
import os
import shutil
import sys

import torch

from pipelines import build_loaders
from pipelines.errors import UserError
from training.cli import run_main
from training.config import load_config, to_yaml
from training.loop import Trainer
from training.runtime import (check_same_config, check_world, dist_from_env, init_distributed, resolve_device,
                              seed_everything, write_run_info)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="CRLD knowledge-distillation trainer",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="YAML file: a small diff over the defaults")
    ap.add_argument("--pipeline", help="data backend (shorthand for pipeline.name=...)")
    ap.add_argument("--resume", action="store_true", help="continue from runs/<name>/last.pt")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1 method.name=kd")
    return ap.parse_intermixed_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"pipeline.name={args.pipeline}"] if args.pipeline else [])
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return None
    dist = dist_from_env()
    check_world(cfg, dist)
    device = resolve_device(cfg.run.device, dist)
    init_distributed(dist, device, cfg.run.dist_timeout_s)
    check_same_config(to_yaml(cfg), dist)
    name = cfg.run.name or f"{cfg.method.name}_{cfg.model.name}"
    run_dir = os.path.join(cfg.run.out_dir, name)
    last = os.path.join(run_dir, "last.pt")
    if args.resume and not os.path.isfile(last):
        raise UserError(f"--resume: no checkpoint at {last}")
    if not args.resume and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        if not args.overwrite:  # every rank sees the same folder, so every rank stops here
            raise UserError(f"{run_dir} already holds a run; use --resume, --overwrite "
                                  f"or another run.name")
        if dist.is_main:
            shutil.rmtree(run_dir)
    if dist.world > 1:
        torch.distributed.barrier()
    seed_everything(cfg.run.seed + dist.rank, cfg.run.deterministic)
    if dist.is_main:
        write_run_info(run_dir, to_yaml(cfg), device)
    train_loader, val_loader, train_src = build_loaders(cfg, device, dist.rank, dist.world)
    trainer = Trainer(cfg, device, run_dir, train_loader, val_loader, dist, train_source=train_src)
    if args.resume:
        trainer.resume(last)
        logging.info("resumed %s at epoch %d", last, trainer.epoch)
    summary = trainer.fit()
    if dist.is_main:
        print(f"done: best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
              f"last top-1 {summary['last_top1']:.2f}, {summary['wall_time_s']:.0f}s -> {run_dir}")
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main))
