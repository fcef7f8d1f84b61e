"""The GPU window's first stage: what the machine is and holds (versions, every optional package and the
project's entry points imported in a fresh interpreter, the driver) and its bf16 matmul rate, the denominator
of MFU. The correctness checks that follow it are tests: `pytest -m cuda` (tests/cuda/).

    python -m gpu_window.preflight OUT_DIR                # on a GPU machine
    python -m gpu_window.preflight OUT_DIR --cpu-dry-run  # the same code paths on a CPU (the tests)

Writes OUT_DIR/preflight.json and OUT_DIR/preflight.md. Exit 0, or 3 without a CUDA device and --cpu-dry-run.
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys

import numpy
import PIL
import torch

from bench.step_e2e import matmul_peak_tflops  # the rate `python -m bench` divides by for MFU
from common.files import save_atomic, save_json_atomic
from training.runtime import git_commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, for MFU; first matching substring wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.6), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.1), ("B200", 2250.0), ("A10G", 70.0))
OPTIONAL = {"dali": "nvidia.dali", "ffcv": "ffcv", "apex": "apex"}
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


def matmul(device, small):
    """bf16 (n x n) @ (n x n) rate; 2 n^3 FLOP per product."""
    n, iters = (256, 3) if small else (8192, 50)
    tflops = matmul_peak_tflops(device, torch.bfloat16, n, iters)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((p for key, p in PEAK_BF16_TFLOPS if key in name), None)
    return {"n": n, "iters": iters, "tflops": tflops, "peak_dense_bf16_tflops": peak,
            "fraction_of_peak": tflops / peak if peak else None}


def markdown(env, mm):
    lines = [f"# Preflight: {env['device_name']}", "", f"{env['time']} on {env['host']}; bf16 matmul "
             f"{mm['tflops']:.1f} TFLOP/s" + (f" = {mm['fraction_of_peak']:.0%} of {mm['peak_dense_bf16_tflops']:g} "
                                              "dense peak" if mm["peak_dense_bf16_tflops"] else ""),
             "", "| key | value |", "|---|---|"]
    for k, v in env.items():
        if isinstance(v, dict) and "importable" in v:
            v = v.get("version") if v["importable"] else f"not importable ({v['error']})"
        lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--cpu-dry-run", action="store_true", help="on the CPU at tiny sizes")
    args = ap.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"preflight: no CUDA device visible to PyTorch {torch.__version__} (CUDA build {torch.version.cuda}); "
              "use --cpu-dry-run to exercise the script on a CPU", file=sys.stderr)
        return 3
    device = torch.device("cpu" if args.cpu_dry_run else "cuda:0")
    env = environment(device)
    env["dry_run"] = args.cpu_dry_run
    mm = matmul(device, args.cpu_dry_run)
    os.makedirs(args.out_dir, exist_ok=True)
    save_json_atomic(os.path.join(args.out_dir, "preflight.json"), {"env": env, "matmul_bf16": mm})
    save_atomic(os.path.join(args.out_dir, "preflight.md"), lambda f: f.write(markdown(env, mm).encode()))
    print(markdown(env, mm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
