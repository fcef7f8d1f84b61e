"""Step and end-to-end measurements behind `python -m bench step|e2e` (bench/sweep.py runs and reports them).

Step mode times the training step alone on synthetic device-resident batches (forward, backward,
optimizer; the teacher online or read from a real on-disk cache); end-to-end mode runs the real
loader, the trainer and (for `cache`) a cache built first. Both always measure the reference
configuration of the paper's code in the same run (fp32, contiguous layout, online teacher, two
student forwards; end-to-end also the `torch` PIL backend), so every figure is also a ratio.
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from bench.neighbours import beside_neighbours
from pipelines import build_loaders
from pipelines.contract import Batch
from pipelines.device import input_dtype
from training.config import load_config
from training.loop import Trainer
from training.losses import views_needed
from training.models import create_model
from training.runtime import cpu_threads
from training.teacher_cache import EpochWriter, epoch_bytes, file_sha256, fingerprint, write_meta

REFERENCE = {"teacher_source": "online", "amp": "off", "channels_last": False, "compile": False, "pipeline": "torch"}


class _Timer:
    """Phase times: CUDA events on a GPU (no host sync inside the phase), wall clock on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.spans = {}

    @contextmanager
    def span(self, name):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.spans.setdefault(name, []).append((a, b))
        else:
            t = time.perf_counter()
            yield
            self.spans.setdefault(name, []).append(1000 * (time.perf_counter() - t))

    def ms(self):
        if self.cuda:
            torch.cuda.synchronize()
        return {k: float(np.median([a.elapsed_time(b) for a, b in v] if self.cuda else v))
                for k, v in self.spans.items()}


class SyntheticLoader:
    """Device-resident random two-view batches (a few distinct ones, cycled) with distinct indices."""

    def __init__(self, steps, batch, size, num_classes, device, channels_last, distinct=4, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        mf = torch.channels_last if channels_last else torch.contiguous_format
        # dtype: what the real loaders deliver (pipelines.device.input_dtype: the AMP dtype under run.amp)
        self.pool = [(torch.randn(batch, 3, size, size, generator=g).to(device, dtype, memory_format=mf),
                      torch.randn(batch, 3, size, size, generator=g).to(device, dtype, memory_format=mf),
                      torch.randint(0, num_classes, (batch,), generator=g).to(device)) for _ in range(distinct)]
        self.index_host = torch.arange(steps * batch).view(steps, batch)
        self.index = self.index_host.to(device)
        self.steps = steps

    def set_epoch(self, epoch, start=0):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        for k in range(self.steps):
            w, s, y = self.pool[k % len(self.pool)]
            yield Batch(w, s, y, self.index[k], self.index_host[k])


class _Labels:  # the minimal "training source" a cache fingerprint needs
    def __init__(self, n, num_classes):
        self.labels = np.arange(n) % num_classes

    def __len__(self):
        return len(self.labels)


def random_teacher_ckpt(name, num_classes, folder):
    path = os.path.join(folder, f"{name}_random.pt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save({"model": create_model(name, num_classes).state_dict()}, path)
    return path


def synthetic_cache(cfg, folder, n, device, topk=0, precision="fp16"):
    """A one-epoch store of random logits with a valid fingerprint: the cache path reads real files."""
    src = _Labels(n, cfg.data.num_classes)
    c = cfg.data.num_classes
    w = EpochWriter(folder, 0, n, c, precision, topk, cfg.method.temperature, cfg.run.seed)
    for start in range(0, n, 4096):
        idx = np.arange(start, min(n, start + 4096))
        w.write(idx, torch.randn(len(idx), 2, c) * 3)
    w.commit()
    write_meta(folder, {"fingerprint": fingerprint(cfg, src, precision=precision, topk=topk,
                                                       teacher_sha=file_sha256(cfg.teacher.ckpt), device=device),
                        "epochs": 1, "num_samples": n, "num_classes": c, "epoch_bytes": epoch_bytes(n, c, precision,
                                                                                                     topk)})
    return src


def run_overrides(args, amp, folder):
    """The settings a measured run and the cache it reads share: models, classes, views, precision."""
    return [f"model.name={args.student}", f"teacher.name={args.teacher}", f"data.num_classes={args.num_classes}",
            f"data.image_size={args.image_size}", f"pipeline.batch_size={args.batch_size}", "method.name=crld",
            f"run.amp={amp}", f"run.device={args.device}", "run.progress=false",
            f"teacher.ckpt={random_teacher_ckpt(args.teacher, args.num_classes, folder)}"]


def data_overrides(args, pipeline):
    """e2e: the real data through `pipeline`."""
    return [f"data.dataset={args.dataset}", f"data.root={args.data}", f"pipeline.name={pipeline}",
            f"pipeline.num_workers={'auto' if args.workers is None else args.workers}", *args.overrides]


def step_config(args, source, amp, channels_last, folder, extra=(), cache_dir=None, compiled=False):
    return load_config(None, [
        *run_overrides(args, amp, folder), f"run.channels_last={str(channels_last).lower()}",
        f"run.compile={str(compiled).lower()}",
        f"teacher.source={source}",
        f"teacher.cache={(cache_dir or os.path.join(folder, 'cache')) if source == 'cache' else ''}", "optim.lr=0.01",
        "optim.epochs=1", *extra])


def flops_per_step(trainer, batch, cached):
    """FLOPs of one training step (teacher forward included when online), counted by PyTorch on the eager
    modules (a compiled graph runs kernels the counter cannot see)."""
    st = trainer.students[0]
    fwd = st.student_fwd, trainer.teacher_fwd
    st.student_fwd, trainer.teacher_fwd = st.model, trainer.teacher
    try:
        with FlopCounterMode(display=False) as fc:
            if cached is None and trainer.teacher is not None:
                cached = trainer.teacher_logits(batch)
            losses = st.forward_losses(batch, cached)[0]
            losses["loss"].backward()
    finally:
        st.student_fwd, trainer.teacher_fwd = fwd
    st.opt.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def time_steps(trainer, pairs, warmup, steps):
    """(samples, seconds, seconds waiting for data) over `steps` steps after `warmup` steps;
    `pairs` yields (batch, cached teacher logits or None)."""
    dev = trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer.train_step(*next(pairs))
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    n, wait, t0 = 0, 0.0, time.perf_counter()
    for _ in range(steps):
        tf = time.perf_counter()
        batch, cached = next(pairs)
        wait += time.perf_counter() - tf
        trainer.train_step(batch, cached)
        n += batch.target.numel()
    sync()
    return n, time.perf_counter() - t0, wait


def profile_steps(trainer, pairs, steps, path):
    """`steps` steady-state steps under torch.profiler: the top operators by self CPU and by self device time,
    and the time spent waiting for the loader, into the text file `path` (where a slow e2e run's time goes)."""
    cuda = trainer.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    wait, t0 = 0.0, time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            tf = time.perf_counter()
            with record_function("data_wait"):
                batch, cached = next(pairs)
            wait += time.perf_counter() - tf
            trainer.train_step(batch, cached)
        sync()
    total = time.perf_counter() - t0
    table = prof.key_averages()
    text = [f"{steps} steps in {total * 1e3:.1f} ms (profiled), data wait {wait * 1e3:.1f} ms ({wait / total:.1%})", "",
            "# by self CPU time", table.table(sort_by="self_cpu_time_total", row_limit=25)]
    if cuda:
        text += ["# by self device time", table.table(sort_by="self_cuda_time_total", row_limit=25)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")


def phase_breakdown(trainer, batches, read_cache):
    """Where a step's time goes: teacher (forward, or cache read), student forward + loss, backward,
    optimizer. Phases are timed apart, so their sum slightly exceeds the fused step."""
    tm, st = _Timer(trainer.device), trainer.students[0]
    for batch in batches:
        with tm.span("teacher"):
            cached = read_cache(batch) if trainer.cache is not None else trainer.teacher_logits(batch)
        with tm.span("student_forward"):
            losses, _ = st.forward_losses(batch, cached)
        with tm.span("backward"):
            st.opt.zero_grad(set_to_none=True)
            st.scaler.scale(losses["loss"]).backward()
        with tm.span("optimizer"):
            st.scaler.step(st.opt)
            st.scaler.update()
    return tm.ms()


def peak_memory_mib(device):
    """Peak device memory of the measured steps; None on a CPU (the process's peak RSS would include every
    configuration measured before this one)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def bench_step_one(args, source, amp, channels_last, dist=None, compiled=False):
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        steps = args.steps + args.warmup
        cfg = step_config(args, source, amp, channels_last, folder, compiled=compiled)
        src = None
        if source == "cache":
            src = synthetic_cache(cfg, os.path.join(folder, "cache"), steps * args.batch_size, device, topk=args.topk)
        loader = SyntheticLoader(steps, args.batch_size, args.image_size, args.num_classes, device, channels_last,
                                 dtype=input_dtype(cfg, device))
        trainer = Trainer(cfg, device, folder, loader, None, dist, train_source=src)
        n, dt, wait = time_steps(trainer, trainer.epoch_batches(0), args.warmup, args.steps)
        peak = peak_memory_mib(device)  # the timed steps' (the FLOP count below runs an uncompiled step of its own)
        few = [b for _, b in zip(range(3), loader)]
        read = (lambda b: trainer.cache.logits(0, b.index_host)) if trainer.cache is not None else None
        phases = phase_breakdown(trainer, few, read)
        flops = flops_per_step(trainer, few[0], read(few[0]) if read else None)
        if trainer.cache is not None:
            trainer.cache.close()
        return {"mode": "step", "teacher": args.teacher, "student": args.student, "image_size": args.image_size,
                "teacher_source": source, "amp": amp, "channels_last": channels_last, "compile": compiled,
                "batch_size": args.batch_size, "steps": args.steps, "samples_per_s": n / dt,
                "ms_per_step": 1000 * dt / args.steps,
                "data_wait_frac": wait / dt, "phases_ms": phases, "gflops_per_sample": flops / args.batch_size / 1e9,
                "achieved_tflops": flops * args.steps / dt / 1e12, "peak_memory_mib": peak,
                "device": str(device), "topk": args.topk if source == "cache" else None}


def matmul_peak_tflops(device, dtype=torch.bfloat16, n=8192, reps=10):
    """The device's measured dense matmul rate (2 n^3 FLOP per product), the denominator of MFU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def e2e_one(args, pipeline, source, amp, channels_last, cache_dir, folder, dist=None, compiled=False, students=1):
    """Real loader + trainer for `--steps` steps after `--warmup` (epochs wrap as needed), on the CPU threads
    train.py would use; `students` copies of the student trained from each batch (a group run). With
    `--neighbours N`, the same steps again beside N busy processes."""
    device = torch.device(args.device)
    extra = [*data_overrides(args, pipeline), "optim.epochs=1000"]
    if source == "cache":
        extra += ["teacher.cache_cycle=true"]
    cfg = step_config(args, source, amp, channels_last, folder, extra, cache_dir=cache_dir, compiled=compiled)
    with cpu_threads(cfg, device) as cpus:
        train, _, src = build_loaders(cfg, device, dist.rank if dist else 0, dist.world if dist else 1,
                                     views_needed(cfg.method.name))
        trainer = Trainer(cfg, device, folder, train, None, dist, train_source=src,
                          students=[(cfg, folder)] * students)

        def stream():  # epochs back to back, each with its own views (and cache rows)
            epoch = 0
            while True:
                yield from trainer.epoch_batches(epoch)
                epoch += 1
        pairs = stream()
        n, dt, wait = time_steps(trainer, pairs, args.warmup, args.steps)
        peak = peak_memory_mib(device)  # the timed steps', not the profiled or loaded ones'
        loaded = {}
        if getattr(args, "neighbours", 0):
            loaded = beside_neighbours(lambda: time_steps(trainer, pairs, args.warmup, args.steps), args.neighbours,
                                       n / dt)
        if getattr(args, "profile", None):
            profile_steps(trainer, pairs, min(10, args.steps),
                          os.path.join(args.profile, f"prof_{pipeline}_{source}_{amp}.txt"))
    return {"mode": "e2e", "pipeline": pipeline, "teacher": args.teacher, "student": args.student,
            "image_size": args.image_size, "teacher_source": source, "amp": amp, "channels_last": channels_last,
            "compile": compiled, "students": students, "batch_size": args.batch_size, "steps": args.steps,
            "samples_per_s": n / dt, "data_wait_frac": wait / dt, "peak_memory_mib": peak, "device": str(device),
            "cpus": cpus.info(), **loaded}
