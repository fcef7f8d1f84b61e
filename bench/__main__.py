"""Benchmarks: loader, training step and end to end, each against a reference measured in the same run.

    python -m bench step --teacher resnet32x4 --student resnet8x4 --image-size 32 \
        --teacher-source online,cache [--amp off,bf16] [--channels-last on,off] [--json OUT]
    python -m bench step --teacher imagenet_resnet34 --student imagenet_resnet18 --num-classes 1000 \
        --image-size 224 --batch-size 256 --teacher-source online,cache --amp bf16 --topk 0 [--compile on,off]
    python -m bench e2e --pipelines torch,dali --teacher-source online,cache     # demo data at 32x32
    python -m bench e2e --pipelines torch --students 1,4     # a group of 4 students against 4 solo runs
    python -m bench e2e --pipelines torch,dali --neighbours 3     # quiet, then beside 3 busy processes
    torchrun --nproc_per_node=8 -m bench step ...                               # per rank + aggregate
    python -m bench cache --teacher resnet32x4 --epochs 2 [--topk K] [--precision fp16]   # cache build samples/s
    torchrun --nproc_per_node=8 -m bench cache ...                              # per rank + aggregate

    python -m bench loader --pipelines torch,dali --data data/jpeg_bench --image-size 224 \
        --batch-size 64 --batches 20 [--json OUT]
    python -m bench loader --pipelines torch,dali --make-data 512   # writes ImageNet-like JPEGs first
    python -m bench loader --pipelines ffcv,ffcv_two_decode ...     # decode once vs FFCV's two decoders
    python -m bench loader --pipelines dali,ffcv ... pipeline.route=device   # the accelerator route

Loader mode: two-view samples/s of each data backend on the same data and machine.
Each backend runs the training loader (both views, strong augmentation included, output on the
training device, normalised) for `--warmup` batches, then is timed over `--batches` batches; a second,
short pass counts the Python function calls the training process (all its threads) makes per batch
(`--count-calls NAMES` picks the pipelines counted; `pipeline.route=device` forces the accelerator route
on a CPU). One JSON record per pipeline:
pipeline, samples_per_s, python_calls_per_batch, route, batches, batch_size, image_size, device, ...

Step mode: synthetic device-resident batches through the training step (teacher forward or a real
on-disk cache read, two student forwards, CRLD loss, backward, optimizer), per-phase times (CUDA
events on a GPU, wall clock on a CPU), FLOPs per sample, achieved TFLOP/s and, on a GPU, MFU over
the card's measured bf16 matmul rate. E2E mode: real loader + trainer (+ a cache built first for
`cache`), with the data-wait fraction. Both add the reference configuration of the paper's code
(fp32, contiguous, online teacher; e2e: `torch` backend) and report ratios to it. `--neighbours N` measures
each e2e configuration again beside N processes spinning on the same CPUs (bench/neighbours.py): records gain
quiet_samples_per_s, loaded_samples_per_s and loaded_vs_quiet.
"""
from common.cpus import spin_briefly

spin_briefly()  # before torch loads OpenMP, which reads its settings once
import argparse
import os
import sys

import torch

from bench.cache_build import run_cache_bench
from bench.loader import run_loader_bench
from bench.neighbours import print_loaded
from bench.sweep import run_training_bench
from training.cli import run_main
from training.runtime import dist_from_env


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description="benchmarks", epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["loader", "step", "e2e", "cache"])
    ap.add_argument("--pipelines", default="torch,dali")
    ap.add_argument("--data", default="data/jpeg_bench")
    ap.add_argument("--make-data", type=int, default=0, help="first write this many ImageNet-like JPEGs to --data")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the pipelines this many times; report medians")
    ap.add_argument("--workers", type=int, help="loader workers (default: loader mode one per CPU; e2e mode "
                    "pipeline.num_workers=auto, the run's CPU plan as train.py makes it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--num-classes", type=int, default=0, help="default: 100 (step), the data's (e2e)")
    ap.add_argument("--teacher-source", default="online,cache")
    ap.add_argument("--amp", default="", help="comma list of off|bf16|fp16 (default: bf16 on CUDA, off on CPU)")
    ap.add_argument("--channels-last", nargs="?", const="on", default="on", help="on | off | on,off")
    ap.add_argument("--compile", nargs="?", const="on", default="off",
                    help="on | off | on,off: torch.compile the student and the online teacher (run.compile)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--students", default="1", help="e2e: comma list of group sizes K (K copies of the student "
                    "trained from one data pass); K>1 reports student-samples/s against K solo runs")
    ap.add_argument("--neighbours", type=int, default=0, metavar="N",
                    help="e2e: measure each configuration again beside N busy processes (pure Python spinning)")
    ap.add_argument("--topk", type=int, default=0, help="step and cache modes: the cache stores the top-k logits")
    ap.add_argument("--epochs", type=int, default=1, help="cache mode: augmentation epochs built")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"), help="cache mode: storage")
    ap.add_argument("--cache-dir", default="runs/bench_cache",
                    help="cache mode: where the cache is built (shared by every rank), removed after")
    ap.add_argument("--synthetic", action="store_true", help="step mode (always synthetic inputs)")
    ap.add_argument("--dataset", default="demo", help="e2e: data.dataset of --data")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference configuration")
    ap.add_argument("--profile", metavar="DIR", help="e2e: min(10, --steps) more steps of each configuration under torch.profiler, "
                                                      "top operators into DIR/prof_<pipeline>_<source>_<amp>.txt")
    ap.add_argument("--count-calls", default="all", metavar="NAMES",
                    help="loader: the pipelines whose Python calls per batch are counted, a comma list or 'all' "
                         "(a second, short pass per pipeline, in a fresh process)")
    ap.add_argument("--no-count-calls", dest="count_calls", action="store_const", const="",
                    help="loader: count no pipeline's calls")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. pipeline.route=device")
    args = ap.parse_intermixed_args(argv)
    if args.neighbours and args.mode != "e2e" or args.neighbours < 0:
        ap.error(f"--neighbours must be a count >= 0, for e2e mode only (got {args.neighbours}, mode {args.mode})")
    if args.mode == "loader":
        args.workers = (os.cpu_count() or 2) if args.workers is None else args.workers
        return run_loader_bench(args)
    if args.mode == "cache":
        args.data = "data/demo" if args.data == ap.get_default("data") else args.data
        return run_cache_bench(args)
    records = run_training_bench(args, ap)
    if args.neighbours and dist_from_env().is_main:  # the main table's rank
        print_loaded([r for r in records if "neighbours" in r])
    return records


if __name__ == "__main__":
    sys.exit(run_main(main))
