"""Benchmarks: loader, training step and end to end, each against a reference measured in the same run.

    python bench.py step --teacher resnet32x4 --student resnet8x4 --image-size 32 \
        --teacher-source online,cache [--amp off,bf16] [--channels-last on,off] [--json OUT]
    python bench.py step --teacher imagenet_resnet34 --student imagenet_resnet18 --num-classes 1000 \
        --image-size 224 --batch-size 256 --teacher-source online,cache --amp bf16 --topk 0 [--compile on,off]
    python bench.py e2e --pipelines torch,dali --teacher-source online,cache     # demo data at 32x32
    torchrun --nproc_per_node=8 bench.py step ...                               # per rank + aggregate

    python bench.py loader --pipelines torch,dali --data data/jpeg_bench --image-size 224 \
        --batch-size 64 --batches 20 [--json OUT]
    python bench.py loader --pipelines torch,dali --make-data 512   # writes ImageNet-like JPEGs first
    python bench.py loader --pipelines ffcv,ffcv_two_decode ...     # decode once vs FFCV's two decoders
    python bench.py loader --pipelines dali,ffcv ... pipeline.route=device   # the accelerator route

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
(fp32, contiguous, online teacher; e2e: `torch` backend) and report ratios to it.
"""
import argparse
import functools
import itertools
import json
import os
import sys
import time

import torch

from bench_report import save_json, run_training_bench
from bench_training import machine
from datasets_prep.make_jpeg_folder import make_jpeg_folder
from datasets_prep.prep_ffcv import main as prep
from pipelines.errors import UserError
from training.cli import run_main


def loader_overrides(data, image_size, batch_size, workers, device, extra=()):
    """The config of a loader measurement: an ImageFolder at `data`, RandomResizedCrop views, CRLD's two views."""
    from pipelines.sources import FolderSource
    classes = len(FolderSource(os.path.join(data, "train")).classes)
    return ["data.dataset=imagefolder", f"data.root={data}", f"data.num_classes={classes}",
            f"data.image_size={image_size}", "data.train_crop=rrc", f"data.val_resize={image_size}",
            f"pipeline.batch_size={batch_size}", f"pipeline.num_workers={workers}", f"run.device={device}",
            "method.name=crld", *extra]


def _train_loader(cfg, device):
    from pipelines import build_loaders
    train, _, src = build_loaders(cfg, device)
    train.set_epoch(0)
    return train, src


def loader_iter(overrides, device, batch_size):
    """The training loader of `overrides` at `batch_size`, epochs back to back (module level, so that
    `pipelines.call_count.calls_per_batch` can run it in a fresh process)."""
    import torch

    from training.config import load_config
    cfg = load_config(None, [*overrides, f"pipeline.batch_size={batch_size}"])
    train = _train_loader(cfg, torch.device(device))[0]
    for epoch in itertools.count():
        train.set_epoch(epoch)
        yield from train


def bench_loader(name, cfg_over, args, count_calls=True):
    import torch

    from pipelines.call_count import calls_per_batch
    from pipelines.contract import on_device
    from training.config import load_config
    cfg = load_config(None, cfg_over + [f"pipeline.name={name}"])
    device = torch.device(args.device)
    train, src = _train_loader(cfg, device)
    it = iter(train)
    n = 0
    for _ in range(args.warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        try:
            b = next(it)
        except StopIteration:
            train.set_epoch(1)
            it = iter(train)
            b = next(it)
        n += b.weak.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    # The Python calls the training process makes per batch (all its threads), counted in a second, short
    # pass: the counting hook slows every call it sees.
    calls = (calls_per_batch(functools.partial(loader_iter, tuple(cfg_over) + (f"pipeline.name={name}",), device),
                             [args.batch_size], warmup=2, batches=3)[0] if count_calls else None)
    return {"pipeline": name, "samples_per_s": n / dt, "python_calls_per_batch": calls, "batches": args.batches,
            "batch_size": args.batch_size, "image_size": args.image_size, "device": str(device),
            "route": {"torch": "workers", "gpu": "device"}.get(name, "device" if on_device(cfg, device) else "host"),
            "dataset_images": len(src),
            "workers": cfg.pipeline.num_workers, "machine": machine(), "seconds": dt}


def bench_ffcv_two_decode(over, args):
    """FFCV's stock two-view route for comparison: two PipelineSpec decoders on the same field, so each
    image is decoded twice (FFCV's own RandomResizedCrop), then the same host finishing as `ffcv`."""
    import numpy as np
    import torch
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec

    from pipelines.contract import Normalizer, on_device
    from pipelines.ffcv_backend import beton_paths, check_sidecar
    from pipelines.host_views import finish_pairs
    from pipelines.view_params import strong_draws
    from training.config import load_config
    cfg = load_config(None, over + ["pipeline.name=ffcv"])
    path = beton_paths(cfg)[0]
    meta = check_sidecar(path, cfg)
    size = (args.image_size, args.image_size)
    loader = Loader(path, batch_size=args.batch_size, num_workers=args.workers, order=OrderOption.RANDOM,
                    seed=0, drop_last=True, pipelines={
                        "image": [RandomResizedCropRGBImageDecoder(size)],
                        "image2": PipelineSpec("image", decoder=RandomResizedCropRGBImageDecoder(size)),
                        "label": [IntDecoder()]})
    device = torch.device(args.device)  # the same device as the other pipelines: GPU finishing on a GPU
    norm = Normalizer(tuple(map(tuple, meta["mean_std"])), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, t0, epoch = 0, None, 0
    while True:
        for b, outs in enumerate(loader):
            w, s = [o for o in outs if np.ndim(o) == 4]  # output order follows FFCV's field handling
            if t0 is None and b == args.warmup:
                sync()
                t0 = time.perf_counter()
            x = torch.from_numpy(np.stack([w, s], 1))
            strong = strong_draws(0, epoch, np.arange(len(w)) + b * args.batch_size)
            finish_pairs(x, strong, norm, 2, on_device(cfg, device))
            if t0 is not None:
                n += len(w)
                if n >= args.batches * args.batch_size:
                    sync()
                    dt = time.perf_counter() - t0
                    return {"pipeline": "ffcv_two_decode", "samples_per_s": n / dt, "batches": args.batches,
                            "batch_size": args.batch_size, "image_size": args.image_size, "device": str(device),
                            "machine": machine(), "seconds": dt}
        epoch += 1


def main(argv=None):
    ap = argparse.ArgumentParser(description="benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("mode", choices=["loader", "step", "e2e"])
    ap.add_argument("--pipelines", default="torch,dali")
    ap.add_argument("--data", default="data/jpeg_bench")
    ap.add_argument("--make-data", type=int, default=0, help="first write this many ImageNet-like JPEGs to --data")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the pipelines this many times; report medians")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
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
    ap.add_argument("--topk", type=int, default=0, help="step mode: the cache stores the top-k logits")
    ap.add_argument("--synthetic", action="store_true", help="step mode (always synthetic inputs)")
    ap.add_argument("--dataset", default="demo", help="e2e: data.dataset of --data")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference configuration")
    ap.add_argument("--profile", metavar="DIR", help="e2e: 10 more steps of each configuration under torch.profiler, "
                                                      "top operators into DIR/prof_<pipeline>_<source>_<amp>.txt")
    ap.add_argument("--count-calls", default="all", metavar="NAMES",
                    help="loader: the pipelines whose Python calls per batch are counted, a comma list or 'all' "
                         "(a second, short pass per pipeline, in a fresh process)")
    ap.add_argument("--no-count-calls", dest="count_calls", action="store_const", const="",
                    help="loader: count no pipeline's calls")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. pipeline.route=device")
    args = ap.parse_intermixed_args(argv)
    if args.mode != "loader":
        return run_training_bench(args, ap)
    names = [n.strip() for n in args.pipelines.split(",")]
    counted = names if args.count_calls == "all" else [n.strip() for n in args.count_calls.split(",") if n.strip()]
    if set(counted) - set(names):
        raise UserError(f"--count-calls={args.count_calls}: {', '.join(sorted(set(counted) - set(names)))} "
                        f"not in --pipelines={args.pipelines}")
    if args.make_data:
        make_jpeg_folder(args.data, train=args.make_data, val=16, classes=8)
    if "ffcv" in args.pipelines:  # convert once with FFCV's ImageNet settings; reused when up to date
        for split in ("train", "val"):
            meta = prep(["--format", "imagefolder", "--src", args.data, "--split", split,
                         "--out", os.path.join(args.data, "ffcv", f"{split}.beton"), "--max-resolution", "512",
                         "--write-mode", "proportion", "--compress-probability", "0.5", "--jpeg-quality", "90"])
            print(f"ffcv {split}.beton: {meta['num_samples']} images, {meta['beton_bytes'] / 2**20:.0f} MiB, "
                  f"converted at {meta['images_per_s']:.0f} images/s")
    over = loader_overrides(args.data, args.image_size, args.batch_size, args.workers, args.device,
                            args.overrides)
    runs = {n: [] for n in names}
    records = []
    for r in range(args.repeat):  # alternating rounds, so a noisy neighbour hits every pipeline alike
        for name in names:
            count = name in counted and r == 0  # once: the count does not vary between rounds
            run = bench_ffcv_two_decode if name == "ffcv_two_decode" else (
                lambda o, a, n=name: bench_loader(n, o, a, count))
            try:
                runs[name].append(run(over, args))
            except Exception as e:  # noqa: BLE001 - recorded; the other pipelines are still measured
                import traceback
                traceback.print_exc()
                runs[name].append({"pipeline": name, "samples_per_s": 0.0, "error": f"{type(e).__name__}: {e}"[:300]})
            records = _loader_records(names, runs)
            if args.json:  # after every run, so that a later failure or a kill keeps what was measured
                save_json(args.json, records)
    for rec in records:
        calls = rec.get("python_calls_per_batch")
        if rec.get("error"):
            print(f"{rec['pipeline']:>6}: FAILED {rec['error']}")
            continue
        print(f"{rec['pipeline']:>6}: {rec['samples_per_s']:8.1f} two-view samples/s (median of {args.repeat}; "
              f"{args.batches} x {args.batch_size} at {args.image_size}px on {rec['device']}, {rec['machine']}; "
              f"route {rec.get('route', 'host')}"
              + (f", {calls:.0f} Python calls per batch in the training process)" if calls else ")"))
    base = records[0]["samples_per_s"]
    for r in records[1:]:
        if base and not r.get("error"):
            print(f"{r['pipeline']:>6}: {r['samples_per_s'] / base:.2f}x {records[0]['pipeline']}")
    if any(r.get("error") for r in records):
        raise SystemExit(1)
    return records


def _loader_records(names, runs):
    """Per pipeline the median run of those so far (a failed run counts as 0 samples/s and keeps its error)."""
    records = []
    for name in names:
        if not runs[name]:
            continue
        rec = dict(sorted(runs[name], key=lambda r: r["samples_per_s"])[len(runs[name]) // 2])
        rec["runs_samples_per_s"] = [round(r["samples_per_s"], 1) for r in runs[name]]
        rec["python_calls_per_batch"] = runs[name][0].get("python_calls_per_batch")
        errors = [r["error"] for r in runs[name] if r.get("error")]
        if errors:
            rec["error"] = errors[0]
        records.append(rec)
    return records


if __name__ == "__main__":
    sys.exit(run_main(main))
