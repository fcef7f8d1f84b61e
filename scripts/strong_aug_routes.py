"""Where the strong view's RandAugment + Cutout should run on a CPU: measured (docs/benchmarks.md).

    .venv/bin/python scripts/strong_aug_routes.py [--batch-size 64] [--size 224] [--batches 10] [--json OUT]

Three routes over the same uint8 crops (batch of --size x --size, one view each):
  dali_stock_rand_augment  DALI's own `rand_augment` (n=2, m=15; CPU operators, DALI's threads). A lower
                           bound for building the paper's op set from DALI operators: the stock policy
                           has fewer ops than the paper's, binned magnitudes and no Cutout.
  pil_host_pool            the paper's ops in PIL, one sample per task on the host pool (what the
                           `dali` and `ffcv` backends do on a CPU).
  tensor_batched           the batched per-sample tensor augmenter (`pipelines.randaugment_tensor`,
                           what they do on a GPU), run on the CPU.
Prints samples/s per route (median of --repeat rounds).
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment

from pipelines.host_views import strong_views
from pipelines.randaugment_tensor import StrongBatch, apply_strong_batch
from pipelines.view_params import strong_draws


@pipeline_def(enable_conditionals=True)
def _stock(batch_of):
    images = fn.external_source(source=batch_of, batch=True, dtype=types.UINT8, ndim=3, layout="HWC")
    return rand_augment.rand_augment(images, n=2, m=15)


def _rate(run, batch, batches, repeat):
    run()
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(batches):
            run()
        rates.append(batch * batches / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    n, cores = a.batch_size, os.cpu_count() or 1
    rng = np.random.default_rng(0)
    # smooth random images (noise would make every op's cost atypical): upsampled 8x8 colour fields
    small = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)).float()
    x = torch.nn.functional.interpolate(small, size=(a.size, a.size), mode="bilinear").round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).contiguous()
    draws = strong_draws(0, 0, np.arange(n))
    arrays = [x[i].numpy() for i in range(n)]
    pipe = _stock(lambda: arrays, batch_size=n, num_threads=cores, device_id=None, prefetch_queue_depth=1, seed=0)
    pipe.build()
    out = {
        "dali_stock_rand_augment": _rate(pipe.run, n, a.batches, a.repeat),
        "pil_host_pool": _rate(lambda: strong_views(x, draws, torch.device("cpu"), False), n, a.batches, a.repeat),
    }
    out["tensor_batched"] = _rate(lambda: apply_strong_batch(x, StrongBatch.from_draws(draws),
                                                             channels_last_input=True), n, a.batches, a.repeat)
    for name, (med, rounds) in out.items():
        print(f"{name:26s} {med:8.0f} samples/s   rounds {', '.join(f'{r:.0f}' for r in rounds)}")
    if a.json:
        json.dump([{"route": k, "samples_per_s": m, "rounds": r, "batch_size": n, "size": a.size, "cores": cores}
                   for k, (m, r) in out.items()], open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
