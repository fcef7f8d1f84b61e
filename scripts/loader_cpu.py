"""CPU cost of one training loader: samples/s, CPU ms per sample, page faults and system time.

    python scripts/loader_cpu.py dali [--data data/jpeg_bench] [--epochs 3] [overrides ...]
    CRLD_KEEP_FREED_MEMORY=0 python scripts/loader_cpu.py torch     # glibc's default allocator behaviour

One process per call (the allocator setting is per process): 4 warm-up batches, then `--epochs` epochs of the
ImageFolder at --data (224 px, batch 64, two views). Worker processes count once they exit (torch).
"""
import argparse
import resource
import time

import torch

from bench import loader_overrides
from pipelines import build_loaders
from training.cli import keep_freed_host_memory
from training.config import load_config


def cpu_seconds():
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline")
    ap.add_argument("--data", default="data/jpeg_bench")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    kept = keep_freed_host_memory()
    cfg = load_config(None, loader_overrides(args.data, 224, 64, 2, "cpu", [f"pipeline.name={args.pipeline}",
                                                                         *args.overrides]))
    train, _, _ = build_loaders(cfg, torch.device("cpu"))
    train.set_epoch(0)
    it = iter(train)
    for _ in range(4):
        next(it)
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    for epoch in range(args.epochs):
        n += sum(b.weak.shape[0] for b in it)
        train.set_epoch(epoch + 1)
        it = iter(train)
    dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{args.pipeline}: {n / dt:.1f} samples/s, {1e3 * dc / n:.2f} ms CPU per sample, {dc / dt:.2f} cores; "
          f"process totals: user {r.ru_utime:.1f} s, system {r.ru_stime:.1f} s, minor faults {r.ru_minflt}; "
          f"freed memory kept: {kept}")


if __name__ == "__main__":
    main()
