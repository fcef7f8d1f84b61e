"""One-GPU check: environment report, correctness smoke tests on CUDA, bf16 matmul TFLOP/s, step benchmark.

    bash scripts/gpu_check.sh OUT_DIR                    # the wrapper: picks the Python, caps the run at 8 min
    python scripts/gpu_check.py OUT_DIR                  # the same, directly
    python scripts/gpu_check.py OUT_DIR --cpu-dry-run    # every code path on the CPU at tiny sizes (tests)

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md, rewritten after each check (a killed run keeps what it
got). Exit 0: every correctness check passed; 1: one failed (performance and step-benchmark results are
recorded, never fatal); 3: no CUDA device and no --cpu-dry-run. Needs PyTorch, numpy, omegaconf, PyYAML, tqdm
and Pillow only; DALI, FFCV and apex are reported when they import. No network.
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import numpy
import PIL
import torch

from bench_training import matmul_peak_tflops  # the rate bench.py divides by for MFU
from pipelines.augment_spec import STRONG_OPS
from pipelines.randaugment_tensor import StrongBatch, apply_strong_batch
from pipelines.view_params import strong_draws
from training.losses import crld_loss
from training.models import create_model
from training.runtime import git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench.py runs from here

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, for MFU; first matching substring wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.6), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.1), ("B200", 2250.0), ("A10G", 70.0))
OPTIONAL = {"dali": "nvidia.dali", "ffcv": "ffcv", "apex": "apex"}
STEP_RUNS = {"imagenet_resnet34_resnet18": ["--teacher", "resnet34", "--student", "resnet18", "--image-size", "224"],
             "cifar_resnet32x4_resnet8x4": ["--teacher", "resnet32x4", "--student", "resnet8x4", "--image-size", "32"]}
STEP_ARGS = ["--teacher-source", "online,cache", "--amp", "bf16", "--channels-last", "--synthetic"]
# --cpu-dry-run: the smallest pair in fp32 at 16 px and batch 2, so that the step benchmark completes in seconds on
# a CPU (resnet32x4 in bf16 does not within the dry run's timeout); it proves the code path, its rates mean nothing
DRY_STEP_RUNS = {"cpu_resnet8_resnet8": ["--teacher", "resnet8", "--student", "resnet8", "--num-classes", "10",
                                         "--image-size", "16"]}
DRY_STEP_ARGS = ["--teacher-source", "online,cache", "--amp", "off", "--channels-last", "--synthetic",
                 "--batch-size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu"]
# torch.compile pays off at 224 px (7-19% on an H100, docs/benchmarks.md), so the check measures both there;
# it costs ~1 min of compilation and is skipped in the CPU dry run.
COMPILE_ARGS = {"imagenet_resnet34_resnet18": ["--compile", "off,on"]}


def probe_imports():
    """Import each optional package in its own process, all at once: FFCV's import takes ~10 s and a broken
    DALI install can crash the interpreter."""
    code = ("import importlib, importlib.metadata as md, sys; m = importlib.import_module(sys.argv[1])\n"
            "try: print(md.version(sys.argv[1]))\n"
            "except md.PackageNotFoundError: print(getattr(m, '__version__', '?'))")
    procs = {k: subprocess.Popen([sys.executable, "-c", code, mod], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, mod in OPTIONAL.items()}
    out = {}
    for k, p in procs.items():
        try:
            so, se = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = "", "import timed out after 120 s"
        if p.returncode == 0:
            out[k] = {"importable": True, "version": so.strip().splitlines()[-1] if so.strip() else "?"}
        else:
            out[k] = {"importable": False, "error": (se.strip().splitlines() or ["?"])[-1][:200]}
    return out


def environment(device):
    env = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "numpy": numpy.__version__, "pillow": PIL.__version__, "cpu_count": os.cpu_count(),
           "device": str(device), "device_name": "cpu (dry run)", "capability": None, "memory_gib": None,
           "device_count": torch.cuda.device_count(), "driver": None, "git": git_commit()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 check=False, capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    env.update(probe_imports())
    return env


def check_model_amp(device, amp, small):
    """resnet8x4 student + teacher, channels_last, 3 optimiser steps under autocast; CRLD loss and grads finite."""
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    student = create_model("resnet8x4", 100).to(device, memory_format=torch.channels_last).train()
    teacher = create_model("resnet8x4", 100).to(device, memory_format=torch.channels_last).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10, enabled=amp == "fp16")
    n, steps = (4, 1) if small else (128, 3)  # CPU fp16 kernels are slow: one step in a dry run
    x_w, x_s = (torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last) for _ in "ws")
    y = torch.randint(0, 100, (n,), device=device)
    before = [p.detach().clone() for p in student.parameters()]
    losses, grads_finite = [], True
    for _ in range(steps):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            t_w, t_s = teacher(x_w), teacher(x_s)
        with torch.autocast(device.type, dtype=dtype):
            s_w, s_s = student(x_w), student(x_s)
        # tau = 0: both confidence gates open, so every KD term contributes.
        out = crld_loss(s_w, s_s, t_w, t_s, y, temperature=4.0, ce_weight=1.0, wv_weight=1.0, cv_weight=1.0,
                        tau_w=0.0, tau_s=0.0)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(opt)
        grads_finite &= all(bool(torch.isfinite(p.grad).all()) for p in student.parameters() if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        losses.append({k: round(float(v.detach()), 5) for k, v in out.items()})
    moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
    finite = all(math.isfinite(v) for ls in losses for v in ls.values())
    ok = finite and grads_finite and moved and s_w.dtype == dtype
    return ok, {"summary": f"loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}, grads finite {grads_finite}, "
                           f"logits {str(s_w.dtype).replace('torch.', '')}, params updated {moved}",
                "batch": n, "losses": losses, "grads_finite": grads_finite, "params_updated": moved}


def check_augment(device, small):
    """The batched strong augmenter on `device` against itself on the CPU: same uint8 batch, same StrongBatch.
    Tolerance: max |device - cpu| <= 1 grey level (float rounding); the differing samples' ops are listed."""
    n, hw = (16, 24) if small else (512, 64)
    x = torch.randint(0, 256, (n, hw, hw, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    draws = strong_draws(0, 0, numpy.arange(n))
    params = StrongBatch.from_draws(draws)
    res = {}
    for layout, inp, nhwc in (("nhwc", x, True), ("nchw", x.permute(0, 3, 1, 2).contiguous(), False)):
        ref = apply_strong_batch(inp, params, channels_last_input=nhwc)
        got = apply_strong_batch(inp.to(device), params, channels_last_input=nhwc)
        diff = (ref.int() - got.cpu().int()).abs()
        bad = (diff.flatten(1).amax(1) > 0).nonzero().flatten().tolist()
        res[layout] = {"max_abs_diff": int(diff.max()), "frac_pixels_differing": float((diff > 0).float().mean()),
                       "samples_differing": len(bad),
                       "ops_in_differing_samples": sorted({STRONG_OPS[o].name for i in bad for o in draws.ops[i].tolist()})}
    ok = all(r["max_abs_diff"] <= 1 for r in res.values())
    covered = len(set(draws.ops.ravel().tolist()))
    return ok, {"summary": ", ".join(f"{k}: max diff {r['max_abs_diff']}, {r['samples_differing']}/{n} samples differ"
                                     for k, r in res.items()) + f" ({covered}/{len(STRONG_OPS)} ops exercised)",
                "batch": [n, 3, hw, hw], "tolerance": "max abs diff <= 1 grey level", **res}


def check_graph_program(device, small):
    """`pipeline.strong_program=graph` on `device` (compiled, captured in a CUDA graph, then replayed with new
    inputs and draws) against the segmented augmenter on the CPU. Tolerance: the augmenter's against PIL
    (tests/test_augment_tensor.py), at most 0.2% of pixels differing; the first batch is the capture's."""
    from pipelines.randaugment_static import StrongGraph
    n, hw = (16, 24) if small else (256, 64)
    gen, program, rows = torch.Generator().manual_seed(1), StrongGraph(), []
    t0 = time.perf_counter()
    for b in range(4):
        x = torch.randint(0, 256, (n, hw, hw, 3), dtype=torch.uint8, generator=gen)
        params = StrongBatch.from_draws(strong_draws(0, b, numpy.arange(n)))
        got = program(x.to(device), params, channels_last_input=True).cpu()
        if b == 0:
            first_s = time.perf_counter() - t0
        differ = (got != apply_strong_batch(x, params, channels_last_input=True)).any(-1)
        rows.append({"batch": b, "frac_pixels_differing": float(differ.float().mean()),
                     "samples_differing": int(differ.flatten(1).any(1).sum())})
    worst = max(r["frac_pixels_differing"] for r in rows)
    return worst <= 0.002, {"summary": f"worst batch {worst:.5f} of pixels differ (tolerance 0.002), compile and "
                                       f"capture {first_s:.1f} s, {len(program.graphs)} graph(s)",
                            "batches": rows, "batch": [n, 3, hw, hw]}


def check_gpu_pipeline(device, small, folder):
    """`--pipeline gpu` on `device` (through the side-stream prefetcher on CUDA) against the same route run on
    the CPU: CIFAR-100-shaped random arrays, two batches of epoch 1; weak views bit-exact, strong views within
    the augmenter's 1 grey level (scaled by the normaliser)."""
    from datasets_prep.make_cifar_like import make_cifar_like
    from pipelines import build_loaders
    from training.config import load_config
    root = make_cifar_like(os.path.join(folder, "cifar_like"), train=512 if small else 4096, test=64)
    batches = {}
    for dev in ("cpu", str(device)):
        cfg = load_config(None, ["data.dataset=cifar100", f"data.root={root}", "pipeline.name=gpu", "run.amp=off",
                                 "pipeline.batch_size=128", "pipeline.route=device", f"run.device={dev}"])
        train, _, _ = build_loaders(cfg, torch.device(dev))
        train.set_epoch(1)
        it = iter(train)
        batches[dev] = [next(it) for _ in range(2)]
        if torch.device(dev).type == "cuda":
            torch.cuda.synchronize()
    ref, got = batches["cpu"], batches[str(device)]
    weak_exact = all(torch.equal(a.weak, b.weak.cpu()) and torch.equal(a.index, b.index.cpu()) for a, b in zip(ref, got))
    strong_diff = max(float((a.strong - b.strong.cpu()).abs().max()) for a, b in zip(ref, got))
    ok = weak_exact and strong_diff <= 1.0 / (255 * 0.25)
    return ok, {"summary": f"weak views {'bit-exact' if weak_exact else 'DIFFER'}, strong max diff {strong_diff:.4f}",
                "weak_exact": weak_exact, "strong_max_abs_diff_normalised": strong_diff}


def check_matmul(device, small):
    """bf16 (n x n) @ (n x n) rate; 2 n^3 FLOP per product."""
    n, iters = (256, 3) if small else (8192, 50)
    tflops = matmul_peak_tflops(device, torch.bfloat16, n, iters)
    sec = 2 * n ** 3 * iters / tflops / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((p for key, p in PEAK_BF16_TFLOPS if key in name), None)
    frac = tflops / peak if peak else None
    return True, {"summary": f"{tflops:.1f} TFLOP/s bf16" + (f" = {frac:.0%} of {peak:g} dense peak" if peak else ""),
                  "n": n, "iters": iters, "seconds": sec, "tflops": tflops, "peak_dense_bf16_tflops": peak,
                  "fraction_of_peak": frac}


def check_step_cli():
    """`bench.py step --help` must succeed and list the step flags (argparse prints help before it checks the
    mode, so the exit code alone proves nothing)."""
    r = subprocess.run([sys.executable, "bench.py", "step", "--help"], check=False, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    ok = r.returncode == 0 and "--teacher-source" in r.stdout
    tail = (r.stderr.strip().splitlines() or ["help lists no --teacher-source: no step mode yet"])[-1][:200]
    return ok, {"summary": "bench.py step available" if ok else f"`bench.py step --help` exit {r.returncode}: {tail}"}


def check_step(name, out_dir, small, timeout):
    path = os.path.join(out_dir, f"step_{name}.json")
    args = (DRY_STEP_RUNS[name] + DRY_STEP_ARGS if small else
            STEP_RUNS[name] + STEP_ARGS + ["--batch-size", "256", "--steps", "30"] + COMPILE_ARGS.get(name, []))
    cmd = [sys.executable, "bench.py", "step", *args, "--json", path]
    try:
        r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, {"summary": f"timed out after {timeout} s", "cmd": " ".join(cmd[1:])}
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    if r.returncode != 0 or not os.path.exists(path):
        return False, {"summary": f"exit {r.returncode}: {tail[-1][:200] if tail else ''}", "cmd": " ".join(cmd[1:]),
                       "output_tail": tail}
    with open(path) as f:
        records = json.load(f)
    records = records if isinstance(records, list) else [records]
    short = "; ".join(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                                if isinstance(v, (int, float, str)) and len(str(v)) < 40) for rec in records)
    return True, {"summary": short[:600], "cmd": " ".join(cmd[1:]), "records": records, "output_tail": tail}


def write_report(out_dir, env, checks, finished):
    failed = [c["name"] for c in checks if c["kind"] == "correctness" and not c["ok"]]
    doc = {"env": env, "checks": checks, "correctness_ok": not failed, "failed": failed, "finished": finished}
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    lines = [f"# GPU check: {env['device_name']}", "", f"{env['time']} on {env['host']}; "
             + ("all correctness checks passed" if not failed else f"FAILED: {', '.join(failed)}")
             + ("" if finished else " (run incomplete)"), "", "## Environment", "", "| key | value |", "|---|---|"]
    for k, v in env.items():
        if isinstance(v, dict) and "importable" in v:
            v = v.get("version") if v["importable"] else f"not importable ({v['error']})"
        lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    lines += ["", "## Checks", "", "| check | kind | result | seconds | details |", "|---|---|---|---|---|"]
    for c in checks:
        res = "pass" if c["ok"] else ("FAIL" if c["kind"] == "correctness" else "not ok")
        detail = c.get("error") or c["details"].get("summary", "")
        lines.append(f"| {c['name']} | {c['kind']} | {res} | {c['seconds']:.1f} | {str(detail).replace('|', '/')} |")
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return failed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every check on the CPU at tiny sizes")
    ap.add_argument("--step-timeout", type=int, default=0,
                    help="seconds per step-benchmark run (0: 300, or 120 in a dry run)")
    args = ap.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to PyTorch {torch.__version__} (CUDA build {torch.version.cuda}); "
              "nothing to check (use --cpu-dry-run to exercise the script on a CPU)", file=sys.stderr)
        return 3
    small = args.cpu_dry_run
    device = torch.device("cpu" if small else "cuda:0")
    os.makedirs(args.out_dir, exist_ok=True)
    env = environment(device)
    env["dry_run"] = small
    checks = []

    def run(name, kind, fn, *a):
        t0 = time.perf_counter()
        try:
            ok, details = fn(*a)
            rec = {"ok": bool(ok), "details": details}
        except Exception as e:  # noqa: BLE001 - recorded, the next check still runs
            rec = {"ok": False, "details": {}, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                   "traceback": traceback.format_exc()[-3000:]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        checks.append({"name": name, "kind": kind, "seconds": time.perf_counter() - t0, **rec})
        print(f"[gpu_check] {name}: {'ok' if rec['ok'] else 'NOT OK'} "
              f"{rec.get('error') or rec['details'].get('summary', '')}", flush=True)
        write_report(args.out_dir, env, checks, finished=False)

    for amp in ("bf16", "fp16"):
        run(f"resnet8x4_crld_{amp}_channels_last", "correctness", check_model_amp, device, amp, small)
    run("augmenter_device_vs_cpu", "correctness", check_augment, device, small)
    run("strong_graph_program_vs_cpu", "correctness", check_graph_program, device, small)
    run("gpu_pipeline_device_vs_cpu", "correctness", check_gpu_pipeline, device, small, args.out_dir)
    run("matmul_bf16_tflops", "performance", check_matmul, device, small)
    run("bench_step_cli", "benchmark", check_step_cli)
    if checks[-1]["ok"]:
        timeout = args.step_timeout or (120 if small else 300)  # the dry run's cap: seconds of work on a loaded CPU
        for name in (DRY_STEP_RUNS if small else STEP_RUNS):
            run(f"step_{name}", "benchmark", check_step, name, args.out_dir, small, timeout)
    failed = write_report(args.out_dir, env, checks, finished=True)
    print(f"[gpu_check] report: {os.path.join(args.out_dir, 'gpu_check.md')}; "
          + ("correctness checks passed" if not failed else f"correctness FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
