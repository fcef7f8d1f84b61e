"""`python -m bench step|e2e`: run the configurations, gather them across ranks, print and save the report."""
from __future__ import annotations

import os
import tempfile
import traceback

import torch

import cache_teacher
from bench.records import machine, save_json
from bench.step_e2e import REFERENCE, bench_step_one, data_overrides, e2e_one, matmul_peak_tflops, run_overrides
from pipelines import available_pipelines
from training.models import available_models
from training.runtime import dist_from_env, init_distributed


KEYS = ("pipeline", "teacher_source", "amp", "channels_last", "compile", "students")


def _list(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def _configs(args):
    """The reference configuration first, then every requested combination."""
    amps = _list(args.amp) or (["bf16"] if args.device.startswith("cuda") else ["off"])
    onoff = {"on": True, "off": False}
    layouts = [onoff[x] for x in _list(args.channels_last)]
    compiles = [onoff[x] for x in _list(args.compile)]
    pipes = _list(args.pipelines) if args.mode == "e2e" else ["-"]
    groups = [int(k) for k in _list(args.students)] if args.mode == "e2e" else [1]
    out = [] if args.no_reference else [dict(REFERENCE, pipeline=REFERENCE["pipeline"] if args.mode == "e2e" else "-",
                                             students=1, reference=True)]
    for p in pipes:
        for src in _list(args.teacher_source):
            for amp in amps:
                for cl in layouts:
                    for comp in compiles:
                        for k in groups:
                            c = {"pipeline": p, "teacher_source": src, "amp": amp, "channels_last": cl,
                                 "compile": comp, "students": k, "reference": False}
                            if not any(all(o[key] == c[key] for key in KEYS) for o in out):
                                out.append(c)
    return out


def _build_cache(args, folder, amp):
    """e2e: the real cache for the measured steps (built once per precision setting, timed)."""
    out = os.path.join(folder, f"cache_{amp}")
    if os.path.exists(out):
        return out, None
    best = next((p for p in ("dali", "torch") if p in available_pipelines() and p in _list(args.pipelines)), "torch")
    meta = cache_teacher.main(["--out", out, "--epochs", "1", "--no-eval", *run_overrides(args, amp, folder),
                               *data_overrides(args, best)])
    return out, meta["builds"][-1]


def _dist(device_arg: str):
    d = dist_from_env()
    dev = torch.device(f"cuda:{d.local_rank}" if device_arg.startswith("cuda") else device_arg)
    if not torch.distributed.is_initialized():
        init_distributed(d, dev, timeout_s=600)
    return d


def run_training_bench(args, ap):
    d = _dist(args.device)
    if args.device.startswith("cuda"):
        args.device = f"cuda:{d.local_rank}"
        torch.backends.cudnn.benchmark = True  # as in train.py
    if args.mode == "e2e":
        if args.data == ap.get_default("data"):
            args.data = "data/demo"
        if args.dataset == "demo" and not os.path.exists(os.path.join(args.data, "meta.json")):
            if d.is_main:
                # imported here: make_demo pulls in scikit-learn (~3 s), which no other benchmark needs
                from datasets_prep.make_demo import make_demo
                make_demo(args.data)
            if d.world > 1:
                torch.distributed.barrier()
        if args.image_size == ap.get_default("image_size") and args.dataset in ("demo", "cifar10", "cifar100"):
            args.image_size = 32
        if not args.num_classes:
            known = {"demo": 10, "cifar10": 10, "cifar100": 100}
            args.num_classes = known.get(args.dataset) or sum(
                e.is_dir() for e in os.scandir(os.path.join(args.data, "train")))
    for attr in ("teacher", "student"):  # `resnet34` means the ImageNet model (the CIFAR zoo has no such name)
        name = getattr(args, attr)
        if name not in available_models() and f"imagenet_{name}" in available_models():
            setattr(args, attr, f"imagenet_{name}")
    args.num_classes = args.num_classes or (1000 if args.teacher.startswith("imagenet_") else 100)
    records, failed = [], []
    with tempfile.TemporaryDirectory() as folder:
        for c in _configs(args):
            try:
                rec = _one(args, c, d, folder)
            except Exception as e:  # noqa: BLE001 - one process: recorded, the next configuration still runs
                if d.world > 1:
                    raise  # the other ranks would wait in the next collective
                traceback.print_exc()
                failed.append(dict(c, error=f"{type(e).__name__}: {e}"[:300]))
                continue
            rec.update(reference=c["reference"], rank=d.rank, world=d.world, machine=machine())
            records.append(rec)
            if args.json and d.world == 1:  # so far, so that a later failure or a kill keeps what was measured
                save_json(args.json, records + failed)
    gathered = [records]
    if d.world > 1:
        gathered = [None] * d.world
        torch.distributed.all_gather_object(gathered, records)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # every rank leaves the group before exiting
    if not d.is_main:
        return records
    out = _report(args, gathered) if records else []
    if args.json:
        save_json(args.json, out + failed)
    if failed:
        for f in failed:
            print(f"FAILED {f['pipeline']}/{f['teacher_source']}/amp={f['amp']}: {f['error']}")
        raise SystemExit(1)
    return out


def _one(args, c, d, folder):
    if args.mode == "step":
        return bench_step_one(args, c["teacher_source"], c["amp"], c["channels_last"], d if d.world > 1 else None,
                              compiled=c["compile"])
    cache_dir, build = _build_cache(args, folder, c["amp"]) if c["teacher_source"] == "cache" else (None, None)
    rec = e2e_one(args, c["pipeline"], c["teacher_source"], c["amp"], c["channels_last"], cache_dir, folder,
                  d if d.world > 1 else None, compiled=c["compile"], students=c["students"])
    if build:
        rec["cache_build"] = build
    return rec


def _report(args, gathered):
    """Per-rank rows and the aggregate (sum over ranks of samples/s), ratios to the reference."""
    world = len(gathered)
    agg = []
    for k, rec in enumerate(gathered[0]):
        r = dict(rec)
        r["samples_per_s"] = sum(g[k]["samples_per_s"] for g in gathered)
        r["per_rank_samples_per_s"] = [g[k]["samples_per_s"] for g in gathered]
        agg.append(r)
    base = next((r for r in agg if r["reference"]), None)
    peak = None
    if args.device.startswith("cuda"):
        peak = matmul_peak_tflops(torch.device(args.device))
    for r in agg:
        r["vs_reference"] = r["samples_per_s"] / base["samples_per_s"] if base else None
        k = r.get("students", 1)
        r["student_samples_per_s"] = k * r["samples_per_s"]
        # K solo runs, one after another, deliver the solo configuration's samples/s in student-samples/s
        solo = next((s for s in agg if s.get("students", 1) == 1 and not s["reference"]
                     and all(s.get(key) == r.get(key) for key in KEYS if key != "students")), None)
        r["vs_solo_runs"] = r["student_samples_per_s"] / solo["samples_per_s"] if solo and k > 1 else None
        if peak and "achieved_tflops" in r and r["amp"] in ("bf16", "fp16"):  # per rank: its FLOP/s over its card
            r["matmul_peak_tflops"], r["mfu"] = peak, r["achieved_tflops"] / peak
    batch = (f"batch {args.batch_size} per rank" if args.mode == "step" else
             f"global batch {args.batch_size} ({args.batch_size // world} per rank)")
    head = (f"{args.mode}: {args.teacher} -> {args.student} at {args.image_size}px, {batch}, {args.steps} steps, "
            f"{world} rank(s), {agg[0]['device']}, {agg[0]['machine']}")
    print(head)
    print(f"{'config':<51} {'samples/s':>10} {'vs ref':>7} {'wait':>6} {'peak MiB':>9}  "
          "phases ms (teacher/fwd/bwd/opt)")
    for r in agg:
        name = (f"{'REFERENCE ' if r['reference'] else ''}{r.get('pipeline', '-')}/{r['teacher_source']}/"
                f"amp={r['amp']}/{'cl' if r['channels_last'] else 'nchw'}{'/compiled' if r.get('compile') else ''}"
                f"{'/students=%d' % r['students'] if r.get('students', 1) > 1 else ''}")
        ph = r.get("phases_ms", {})
        phs = "/".join(f"{ph[k]:.1f}" for k in ("teacher", "student_forward", "backward", "optimizer") if k in ph)
        ratio = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "-"
        mem = f"{r['peak_memory_mib']:>9.0f}" if r["peak_memory_mib"] is not None else f"{'-':>9}"
        print(f"{name:<51} {r['samples_per_s']:>10.1f} {ratio:>7} {r['data_wait_frac']:>6.1%} "
              f"{mem}  {phs}" + (f"  MFU {r['mfu']:.1%}" if r.get("mfu") else ""))
        if r.get("vs_solo_runs"):
            print(f"    {r['students']} students: {r['student_samples_per_s']:.1f} student-samples/s, "
                  f"{r['vs_solo_runs']:.2f}x {r['students']} solo runs")
        if world > 1:
            print("    per rank: " + ", ".join(f"{x:.1f}" for x in r["per_rank_samples_per_s"]))
        if r.get("cache_build"):
            print(f"    cache build: {r['cache_build']['samples_per_s']:.0f} samples/s")
    return agg
