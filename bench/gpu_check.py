"""One-GPU check: environment report (preflight) and correctness on CUDA, the first stages of bench/gpu_run.sh.

    python -m bench.gpu_check OUT_DIR --only env               # preflight: versions, imports, bf16 matmul
    python -m bench.gpu_check OUT_DIR --only correctness       # the CUDA paths against the CPU's
    python -m bench.gpu_check OUT_DIR --only dali              # DALI's GPU decode vs the reference, a dali epoch
    python -m bench.gpu_check OUT_DIR --cpu-dry-run            # every code path on the CPU at tiny sizes (tests)

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md, rewritten after each check (a killed run keeps what it
got; a failing check records its traceback and the next one runs). Exit 0: every correctness check passed; 1: one
failed (performance results are recorded, never fatal); 3: no CUDA device and no --cpu-dry-run. Needs PyTorch,
numpy, omegaconf, PyYAML, tqdm, Pillow and scikit-learn only; DALI, FFCV and apex are used when they import.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy
import PIL
import torch

import train
from bench.step_e2e import matmul_peak_tflops  # the rate `python -m bench` divides by for MFU
from datasets_prep.make_cifar_like import make_cifar_like
from datasets_prep.make_jpeg_folder import make_jpeg_folder
from pipelines import available_pipelines, build_loaders
from pipelines.augment_spec import STRONG_OPS
from pipelines.randaugment_graph import StrongGraph
from pipelines.randaugment_segmented import StrongBatch, apply_strong_batch
from pipelines.view_params import strong_draws
from training.config import load_config
from training.losses import crld_loss
from training.models import create_model
from training.runtime import git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # `python -m bench` runs from here

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, for MFU; first matching substring wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.6), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.1), ("B200", 2250.0), ("A10G", 70.0))
OPTIONAL = {"dali": "nvidia.dali", "ffcv": "ffcv", "apex": "apex"}
GROUPS = {"env", "correctness", "dali"}
# The project's entry points and the modules of the accelerator route, imported in a fresh interpreter: what a
# bare GPU machine lacks (omegaconf, say) shows here first, with its own error.
PROJECT = {"project": "train,eval,bench.__main__,cache_teacher,demo,training.loop,pipelines.gpu_backend,"
                      "pipelines.randaugment_graph,pipelines.prefetch",
           "project_dali": "pipelines.dali_backend", "project_ffcv": "pipelines.ffcv_backend"}


def probe_imports():
    """Import each optional package in its own process, all at once: FFCV's import takes ~10 s and a broken
    DALI install can crash the interpreter."""
    code = ("import importlib, importlib.metadata as md, sys\n"
            "for name in sys.argv[1].split(','): m = importlib.import_module(name)\n"
            "try: print(md.version(sys.argv[1]))\n"
            "except (md.PackageNotFoundError, ValueError): print(getattr(m, '__version__', 'ok'))")
    procs = {k: subprocess.Popen([sys.executable, "-c", code, mod], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT) for k, mod in {**OPTIONAL, **PROJECT}.items()}
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
    (tests/test_augment_segmented.py), at most 0.2% of pixels differing; the first batch is the capture's."""
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


def _grey_levels(x: torch.Tensor, mean_std) -> torch.Tensor:
    """Normalised views back to the uint8 grey levels they came from: the normaliser's multiply-add is fused on
    CUDA and not on the CPU, so the float views may differ in the last bit while the pixels are equal."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in mean_std)
    return (x.double().cpu() * std * 255 + mean * 255).round().to(torch.int16)


def _demo_loaders(folder, small):
    return make_cifar_like(os.path.join(folder, "cifar_like"), train=512 if small else 4096, test=64)


def _gpu_route(root, dev):
    cfg = load_config(None, ["data.dataset=cifar100", f"data.root={root}", "pipeline.name=gpu", "run.amp=off",
                             "pipeline.batch_size=128", "pipeline.route=device", f"run.device={dev}"])
    return build_loaders(cfg, torch.device(dev))


def check_gpu_pipeline(device, small, folder):
    """`--pipeline gpu` on `device` (through the side-stream prefetcher on CUDA) against the same route run on
    the CPU: CIFAR-100-shaped random arrays, two batches of epoch 1. Tolerance: weak views' grey levels equal
    (the floats may differ in the last bit: fused multiply-adds), strong views within the augmenter's 1 grey
    level."""
    root = _demo_loaders(folder, small)
    runs, mean_std = [], None
    for dev in ("cpu", str(device)):
        train, _, src = _gpu_route(root, dev)
        mean_std = src.mean_std
        train.set_epoch(1)
        it = iter(train)
        runs.append([next(it) for _ in range(2)])
        if torch.device(dev).type == "cuda":
            torch.cuda.synchronize()
    ref, got = runs
    index_equal = all(torch.equal(a.index, b.index.cpu()) for a, b in zip(ref, got))
    weak = max(int((_grey_levels(a.weak, mean_std) - _grey_levels(b.weak, mean_std)).abs().max())
               for a, b in zip(ref, got))
    strong = max(int((_grey_levels(a.strong, mean_std) - _grey_levels(b.strong, mean_std)).abs().max())
                 for a, b in zip(ref, got))
    weak_bits = all(torch.equal(a.weak, b.weak.cpu()) for a, b in zip(ref, got))
    ok = index_equal and weak == 0 and strong <= 1
    return ok, {"summary": f"indices {'equal' if index_equal else 'DIFFER'}, weak max {weak} grey levels "
                           f"({'bit-exact' if weak_bits else 'floats differ in low bits'}), strong max {strong}",
                "index_equal": index_equal, "weak_max_grey_levels": weak, "weak_bit_exact": weak_bits,
                "strong_max_grey_levels": strong, "tolerance": "weak 0, strong 1 grey level"}


def check_dali_decode(device, small, folder):
    """`dali` on `device` (on CUDA: nvJPEG decode and GPU resize) against the `torch` reference on the CPU (PIL
    decode), which the teacher cache's fingerprint treats as the same view source: two batches of epoch 1 and
    one validation batch of JPEGs, as grey levels. Tolerance: the CPU tests' (tests/test_dali.py), mean absolute
    difference weak < 1, strong < 2, validation < 1 grey level; beyond it, the decoder belongs in the
    fingerprint."""
    size, resize, shape = (48, 56, (96, 72)) if small else (224, 256, (500, 375))
    root = make_jpeg_folder(os.path.join(folder, f"jpeg_decode_{size}"), train=64, val=16, classes=4, size=shape)
    runs = []
    for pipe, dev in (("torch", "cpu"), ("dali", str(device))):
        cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=4",
                                 f"data.image_size={size}", "data.train_crop=rrc", f"data.val_resize={resize}",
                                 "pipeline.batch_size=16", "pipeline.val_batch_size=16", "pipeline.num_workers=0",
                                 f"pipeline.name={pipe}", "pipeline.route=device", "run.amp=off",
                                 f"run.device={dev}"])
        train, val, src = build_loaders(cfg, torch.device(dev))
        train.set_epoch(1)
        it = iter(train)
        runs.append(([next(it) for _ in range(2)], next(iter(val)), src.mean_std))
        if torch.device(dev).type == "cuda":
            torch.cuda.synchronize()
    (ref, ref_val, mean_std), (got, got_val, _) = runs

    def diff(a, b):
        d = (_grey_levels(a, mean_std) - _grey_levels(b, mean_std)).abs().float()
        return float(d.mean()), int(d.max())
    index_equal = all(torch.equal(a.index.cpu(), b.index.cpu()) for a, b in zip(ref, got))
    weak = max(diff(a.weak, b.weak) for a, b in zip(ref, got))
    strong = max(diff(a.strong, b.strong) for a, b in zip(ref, got))
    val_d = diff(ref_val.image, got_val.image)
    ok = index_equal and weak[0] < 1.0 and strong[0] < 2.0 and val_d[0] < 1.0
    return ok, {"summary": f"indices {'equal' if index_equal else 'DIFFER'}; grey levels mean / max: weak "
                           f"{weak[0]:.2f} / {weak[1]}, strong {strong[0]:.2f} / {strong[1]}, val {val_d[0]:.2f} / "
                           f"{val_d[1]} ({size} px)",
                "index_equal": index_equal, "weak_mean_max": weak, "strong_mean_max": strong, "val_mean_max": val_d,
                "tolerance": "mean weak < 1, strong < 2, val < 1 grey level"}


def check_prefetcher(device, small, folder):
    """The side-stream prefetcher against the same loader unwrapped: every batch of an epoch equal bit for bit,
    with the step's stream kept busy (a spin kernel) after each hand-over, so a missing stream wait or a
    buffer reused too early shows as a differing batch. On a CPU the wrapper passes batches through."""
    root = _demo_loaders(folder, small)
    train, _, _ = _gpu_route(root, str(device))
    plain = getattr(train, "loader", train)
    out = {}
    for name, loader in (("plain", plain), ("prefetched", train)):
        loader.set_epoch(2)
        out[name] = []
        for b in loader:
            if device.type == "cuda":
                torch.cuda._sleep(20_000_000)  # ~10 ms of the step's stream busy while batch k+1 is prepared
            out[name].append([t.clone() for t in b[:4]])
            if name == "plain" and device.type == "cuda":
                torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    same = len(out["plain"]) == len(out["prefetched"]) and all(
        all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(out["plain"], out["prefetched"]))
    return same, {"summary": f"{len(out['prefetched'])} batches {'equal' if same else 'DIFFER'} to the unwrapped "
                             f"loader's ({type(train).__name__})", "batches": len(out["prefetched"])}


def check_train_step(device, small, folder, pipeline):
    """train.py for one short CRLD epoch through `pipeline` on `device` (demo data, a random resnet8 teacher):
    the run finishes, its loss is finite and validation ran."""
    from datasets_prep.make_demo import make_demo  # scikit-learn: only this check needs it
    root = make_demo(os.path.join(folder, "demo"))
    teacher = os.path.join(folder, "teacher_resnet8.pt")
    if not os.path.exists(teacher):
        torch.manual_seed(0)
        torch.save({"model": create_model("resnet8", 10).state_dict()}, teacher)
    t0 = time.perf_counter()
    s = train.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "--pipeline", pipeline,
                    f"data.root={root}", f"run.out_dir={os.path.join(folder, 'runs')}", f"run.name={pipeline}",
                    "data.subset=256", "pipeline.batch_size=64", "optim.epochs=1", "optim.warmup_epochs=0",
                    "run.progress=false", "model.name=resnet8", "teacher.name=resnet8", f"teacher.ckpt={teacher}",
                    f"run.device={device}", "--overwrite"])
    ok = s["epochs"] == 1 and math.isfinite(s["best_top1"])
    return ok, {"summary": f"1 epoch in {time.perf_counter() - t0:.1f} s, top-1 {s['best_top1']:.2f}",
                "summary_json": {k: v for k, v in s.items() if isinstance(v, (int, float, str))}}


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
    ap.add_argument("--only", default="env,correctness,dali",
                    help="comma list of groups: env, correctness, dali (the checks that need DALI)")
    ap.add_argument("--work", help="folder for the checks' data (default: a temporary one)")
    args = ap.parse_args(argv)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    if groups - GROUPS:
        ap.error(f"--only={args.only}: unknown group(s) {', '.join(sorted(groups - GROUPS))}")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to PyTorch {torch.__version__} (CUDA build {torch.version.cuda}); "
              "nothing to check (use --cpu-dry-run to exercise the script on a CPU)", file=sys.stderr)
        return 3
    small = args.cpu_dry_run
    device = torch.device("cpu" if small else "cuda:0")
    os.makedirs(args.out_dir, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    env = environment(device) if "env" in groups else {
        "time": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"}
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
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        checks.append({"name": name, "kind": kind, "seconds": time.perf_counter() - t0, **rec})
        print(f"[gpu_check] {name}: {'ok' if rec['ok'] else 'NOT OK'} "
              f"{rec.get('error') or rec['details'].get('summary', '')}", flush=True)
        write_report(args.out_dir, env, checks, finished=False)

    if "env" in groups:
        run("matmul_bf16_tflops", "performance", check_matmul, device, small)
    if "correctness" in groups:
        for amp in ("bf16", "fp16"):
            run(f"resnet8x4_crld_{amp}_channels_last", "correctness", check_model_amp, device, amp, small)
        run("augmenter_device_vs_cpu", "correctness", check_augment, device, small)
        run("gpu_pipeline_device_vs_cpu", "correctness", check_gpu_pipeline, device, small, work)
        run("prefetcher_vs_unwrapped", "correctness", check_prefetcher, device, small, work)
        for pipeline in ("torch", "gpu"):
            run(f"train_step_{pipeline}", "correctness", check_train_step, device, small, work, pipeline)
        # last: compiling the graph program takes the longest (Inductor), and its capture is the newest code
        run("strong_graph_program_vs_cpu", "correctness", check_graph_program, device, small)
    if "dali" in groups and "dali" in available_pipelines():  # a window's DALI arrives in its last call
        run("dali_decode_vs_torch_reference", "correctness", check_dali_decode, device, small, work)
        run("train_step_dali", "correctness", check_train_step, device, small, work, "dali")
    failed = write_report(args.out_dir, env, checks, finished=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu_check] report: {os.path.join(args.out_dir, 'gpu_check.md')}; "
          + ("correctness checks passed" if not failed else f"correctness FAILED: {', '.join(failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
