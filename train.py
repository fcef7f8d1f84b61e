"""Train a student (or a teacher, with method ce) with CE, KD, DKD or CRLD.

    python train.py --config configs/cifar100/crld/res32x4_res8x4.yaml \
        teacher.ckpt=checkpoints/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth optim.lr=0.05
    python train.py --config configs/demo/crld.yaml --resume          # continue runs/<name>/last.pt
    torchrun --nproc_per_node=8 train.py --config ...                 # one process per GPU (gloo on CPU)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py --config ...              # multi-node (same on each node)
    python train.py --config ... teacher.source=cache teacher.cache=caches/X   # see cache_teacher.py
    python train.py --config configs/demo/crld.yaml \
        --student 'model.name=resnet14' --student 'method.name=kd' --student 'method.name=ce'
                                      # a group: four students from one data pass and one teacher pass

Writes runs/<run.name>/: config.yaml (resolved), run_info.json (git commit, argv, versions),
metrics.jsonl (one line per epoch), best.pt / last.pt (atomic), summary.json. A group (`--student`, or a
`students:` list in the YAML; student 0 is the base config) writes the same per student in
runs/<run.name>/student<k>/, whose config.yaml trains that student alone, and group.json (each student's
overrides and final figures). Each student's weights equal its solo run's (views, teacher logits and its
random stream are its solo run's); a student whose loss turns non-finite stops, the others go on, and the
exit code is then 2.

Preemption: SIGTERM or SIGUSR1 finishes the current step, writes last.pt there (every student's) and exits with
code 75 (training.preemption.EXIT_PREEMPTED), leaving runs/<run.name>/preempted.json (what a job script under
torchrun tests); `--resume` continues from that step with the same batches, views and teacher logits.
`last.pt` is also written mid-epoch every run.save_every_min minutes.
"""
from common.cpus import spin_briefly

spin_briefly()  # before torch loads OpenMP, which reads its settings once
import argparse
import logging
import os
import shutil
import sys

import torch
from omegaconf import OmegaConf

from common import flat_items
from common.errors import UserError
from common.files import check_writable, save_json_atomic
from pipelines import build_loaders
from training.cli import run_main
from training.config import load_group, to_yaml
from training.loop import Trainer
from training.losses import views_needed
from training.preemption import Preempted, StopRequest, clear_preempted, mark_preempted
from training.runtime import (check_same_config, check_world, cpu_threads, dist_from_env, init_distributed,
                              resolve_device, seed_everything, write_run_info)
from training.student import check_resume, resume_students

log = logging.getLogger("train")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="CRLD knowledge-distillation trainer",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="YAML file: a small diff over the defaults")
    ap.add_argument("--pipeline", help="data backend (shorthand for pipeline.name=...)")
    ap.add_argument("--resume", action="store_true", help="continue from runs/<name>/last.pt")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    ap.add_argument("--student", action="append", default=[], metavar="'KEY=V ...'",
                    help="one more student trained from the same data pass: dotted overrides of the base "
                         "config (model.*, method.*, optim.*), several separated by spaces")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1 method.name=kd")
    return ap.parse_intermixed_args(argv)


def _own_keys(cfg, base) -> dict:
    """A student's settings that differ from student 0's (what its overrides changed)."""
    mine, theirs = (dict(flat_items(OmegaConf.to_container(c))) for c in (cfg, base))
    return {k: v for k, v in mine.items() if v != theirs[k] and k != "run.name"}


def write_group(run_dir, cfgs, summaries=None) -> None:
    doc = {"students": [{"dir": f"student{k}", "model": c.model.name, "method": c.method.name,
                         "overrides": _own_keys(c, cfgs[0]), "summary": (summaries or {}).get(k)}
                        for k, c in enumerate(cfgs)]}
    save_json_atomic(os.path.join(run_dir, "group.json"), doc)


def main(argv=None):
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"pipeline.name={args.pipeline}"] if args.pipeline else [])
    cfgs = load_group(args.config, overrides, args.student)
    cfg = cfgs[0]
    if args.print_config:
        print("\n---\n".join(to_yaml(c) for c in cfgs))
        return None
    dist = dist_from_env()
    check_world(cfg, dist)
    device = resolve_device(cfg.run.device, dist)
    with cpu_threads(cfg, device) as cpus:  # before any thread pool starts
        return run(args, cfgs, dist, device, cpus)


def run(args, cfgs, dist, device, cpus):
    """Every rank's training, on the CPU threads `main` set (`cpus`: common.cpus.CpuUse)."""
    cfg, group = cfgs[0], len(cfgs) > 1
    init_distributed(dist, device, cfg.run.dist_timeout_s)
    check_same_config("".join(to_yaml(c) for c in cfgs), dist)
    name = cfg.run.name or f"{cfg.method.name}_{cfg.model.name}"
    run_dir = os.path.join(cfg.run.out_dir, name)
    dirs = [os.path.join(run_dir, f"student{k}") for k in range(len(cfgs))] if group else [run_dir]
    lasts = [os.path.join(d, "last.pt") for d in dirs]
    check_writable(run_dir)  # before any data, teacher or model is built
    if args.resume:  # before any data or model is built: nothing of a refused run is written
        check_resume(lasts, cfgs)
    held = [os.path.join(d, "metrics.jsonl") for d in dirs] + [os.path.join(run_dir, f) for f in ("metrics.jsonl", "group.json")]
    if not args.resume and any(os.path.exists(p) for p in held):
        if not args.overwrite:  # every rank sees the same folder, so every rank stops here
            raise UserError(f"{run_dir} already holds a run; use --resume, --overwrite or another run.name")
        if dist.is_main:
            shutil.rmtree(run_dir)
    if dist.world > 1:
        torch.distributed.barrier()
    seed_everything(cfg.run.seed + dist.rank, cfg.run.deterministic)
    views = max(views_needed(c.method.name) for c in cfgs)
    train_loader, val_loader, train_src = build_loaders(cfg, device, dist.rank, dist.world, views)
    trainer = Trainer(cfg, device, run_dir, train_loader, val_loader, dist, train_source=train_src,
                      students=list(zip(cfgs, dirs)))
    if args.resume:
        resume_students(trainer.students, lasts)
    if dist.is_main:  # only now: a run refused above (data, teacher, a checkpoint of another config) writes nothing
        clear_preempted(run_dir)
        log.info(cpus.line())
        for c, d in zip(cfgs, dirs):
            write_run_info(d, to_yaml(c), device, cpus.info())
        if group:
            write_group(run_dir, cfgs)
    trainer.stop = StopRequest().install()  # SIGTERM / SIGUSR1: a checkpoint at the next step, then EXIT_PREEMPTED
    try:
        summaries = trainer.fit()
    except Preempted as e:
        if dist.is_main:
            mark_preempted(run_dir, str(e))
        if dist.world > 1:
            torch.distributed.destroy_process_group()
        raise
    finally:
        trainer.stop.uninstall()
        trainer.close()  # the cache's reader thread ends before the process group does
    if dist.is_main:
        for k, s in enumerate(summaries):
            tag = f"student {k} ({s['model']}, {s['method']}): " if group else ""
            if "failed" in s:
                print(f"{tag}stopped: {s['failed']}")
            else:
                print(f"{tag}done: best top-1 {s['best_top1']:.2f} (epoch {s['best_epoch']}), "
                      f"last top-1 {s['last_top1']:.2f}, {s['wall_time_s']:.0f}s -> {dirs[k]}")
        if group:
            write_group(run_dir, cfgs, dict(enumerate(summaries)))
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    failed = [k for k, s in enumerate(summaries) if "failed" in s]
    if failed:
        raise UserError(f"student(s) {', '.join(map(str, failed))} of {len(cfgs)} stopped (non-finite loss); "
                        f"the others finished: {os.path.join(run_dir, 'group.json')}")
    return summaries[0] if not group else summaries


if __name__ == "__main__":
    sys.exit(run_main(main))
