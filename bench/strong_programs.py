"""The accelerator route's two strong-view programs side by side (`pipeline.strong_program`).

    .venv/bin/python -m bench.strong_programs [--device cuda] [--batch-size 256] [--size 224]
                                              [--batches 20] [--repeat 3] [--compile] [--json OUT]

For the same uint8 crops and draws, per batch: the ATen calls the program dispatches (each one a kernel
launch on a GPU; counted once, after the warm-up batch; none for a compiled program, whose launches are
fused kernels or, on CUDA, one graph replay), the host time to issue a batch (the
training thread's share: on CUDA the call returns before the device finishes) and the wall time with the
device finished. `segmented` issues few kernels of data-dependent shapes; `graph` runs every op family
over the whole batch but, on CUDA, replays a captured graph. Results go to docs/benchmarks.md.
"""
import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.randaugment_graph import PROGRAMS, StrongGraph, strong_program
from pipelines.randaugment_segmented import StrongBatch
from pipelines.view_params import strong_draws


class _CountAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, x, plans, batches, repeat, compile_on_cpu=False):
    program, device = strong_program(name), x.device
    if name == "graph" and compile_on_cpu:
        program = StrongGraph(compile=True)
    for plan in plans[:2]:  # warm-up: the graph program compiles and captures a shape on its second batch
        program(x, plan, channels_last_input=True)
    calls = None  # a compiled program's launches are not ATen calls (and a dispatch mode stops compilation)
    if not (name == "graph" and (compile_on_cpu or device.type == "cuda")):
        with _CountAten() as count:
            program(x, plans[1], channels_last_input=True)
        calls = count.calls
    host, wall = [], []
    for _ in range(repeat):
        _sync(device)
        issued = 0.0
        t0 = time.perf_counter()
        for b in range(batches):
            t = time.perf_counter()
            program(x, plans[b % len(plans)], channels_last_input=True)
            issued += time.perf_counter() - t
        _sync(device)
        wall.append((time.perf_counter() - t0) / batches * 1e3)
        host.append(issued / batches * 1e3)
    return {"program": name, "aten_calls_per_batch": calls, "host_ms_per_batch": statistics.median(host),
            "wall_ms_per_batch": statistics.median(wall), "host_rounds": host, "wall_rounds": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--programs", default=",".join(PROGRAMS))
    ap.add_argument("--compile", action="store_true",
                    help="compile the graph program on a CPU too (on CUDA it always is): its fused work")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    device, n = torch.device(a.device), a.batch_size
    rng = np.random.default_rng(0)
    # smooth random images (noise would make every op's cost atypical): upsampled 8x8 colour fields
    small = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)).float()
    x = torch.nn.functional.interpolate(small, size=(a.size, a.size), mode="bilinear").round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).contiguous().to(device)
    plans = [StrongBatch.from_draws(strong_draws(0, e, np.arange(n))) for e in range(4)]
    rows = []
    for name in a.programs.split(","):
        r = measure(name, x, plans, a.batches, a.repeat, a.compile)
        compiled = name == "graph" and (a.compile or device.type == "cuda")
        r.update(device=str(device), batch_size=n, size=a.size, compiled=compiled,
                 device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 cpu_threads=torch.get_num_threads())
        rows.append(r)
        print(f"{name:10s} {str(r['aten_calls_per_batch']):>6s} ATen calls/batch   host {r['host_ms_per_batch']:8.2f} ms"
              f"   wall {r['wall_ms_per_batch']:8.2f} ms per batch of {n} ({a.size} px, {device})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
