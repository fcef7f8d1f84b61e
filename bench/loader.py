"""`python -m bench loader` (flags and the record's fields: bench/__main__.py): each data backend's training
loader timed on the same data, then the training process's Python calls per batch counted in a fresh one."""
import functools
import itertools
import os
import time
import traceback

import numpy as np
import torch

from bench.call_count import calls_per_batch
from bench.records import machine, save_json
from common.errors import UserError
from datasets_prep.make_jpeg_folder import make_jpeg_folder
from datasets_prep.prep_ffcv import main as prep
from pipelines import build_loaders, cpu_plan
from pipelines.device import Normalizer, on_device
from pipelines.finish_views import pair_finisher
from pipelines.sources import FolderSource
from pipelines.splits import beton_paths, check_sidecar
from pipelines.view_params import strong_draws
from training.config import load_config
from training.losses import views_needed


def loader_overrides(data, image_size, batch_size, workers, device, extra=()):
    """The config of a loader measurement: an ImageFolder at `data`, RandomResizedCrop views, CRLD's two views."""
    classes = len(FolderSource(os.path.join(data, "train")).classes)
    return ["data.dataset=imagefolder", f"data.root={data}", f"data.num_classes={classes}",
            f"data.image_size={image_size}", "data.train_crop=rrc", f"data.val_resize={image_size}",
            f"pipeline.batch_size={batch_size}", f"pipeline.num_workers={workers}", f"run.device={device}",
            "method.name=crld", *extra]


def _train_loader(cfg, device):
    train, _, src = build_loaders(cfg, device, views=views_needed(cfg.method.name))
    train.set_epoch(0)
    return train, src


def loader_iter(overrides, device, batch_size):
    """The training loader of `overrides` at `batch_size`, epochs back to back (module level, so that
    `bench.call_count.calls_per_batch` can run it in a fresh process)."""
    cfg = load_config(None, [*overrides, f"pipeline.batch_size={batch_size}"])
    train = _train_loader(cfg, torch.device(device))[0]
    for epoch in itertools.count():
        train.set_epoch(epoch)
        yield from train


def bench_loader(name, cfg_over, args, count_calls=True):
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
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec

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
    finish = pair_finisher(on_device(cfg, device), cpu_plan(cfg, device).host_threads)  # as `ffcv`'s host pool
    n, t0, epoch = 0, None, 0
    while True:
        for b, outs in enumerate(loader):
            w, s = [o for o in outs if np.ndim(o) == 4]  # output order follows FFCV's field handling
            if t0 is None and b == args.warmup:
                sync()
                t0 = time.perf_counter()
            x = torch.from_numpy(np.stack([w, s], 1))
            strong = strong_draws(0, epoch, np.arange(len(w)) + b * args.batch_size)
            finish(x, strong, norm, 2)
            if t0 is not None:
                n += len(w)
                if n >= args.batches * args.batch_size:
                    sync()
                    dt = time.perf_counter() - t0
                    return {"pipeline": "ffcv_two_decode", "samples_per_s": n / dt, "batches": args.batches,
                            "batch_size": args.batch_size, "image_size": args.image_size, "device": str(device),
                            "machine": machine(), "seconds": dt}
        epoch += 1


def run_loader_bench(args):
    """`python -m bench loader`: every pipeline of --pipelines, alternating over --repeat rounds."""
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

