"""How much a top-k teacher cache would lose, measured on a full cache of your teacher.

    python scripts/topk_error.py --cache caches/r32x4_c100 --k 5,10,20 --temperature 4 [--json OUT]

Reads the full (fp32/fp16/bf16) cache's logits (all epochs, both views), rebuilds each row from its
top-k as `cache_teacher.py --topk k` would, and reports per k: mean and max KL(full || rebuilt) of the
softmax at the training temperature, the largest error of the T=1 confidence that gates CRLD, and the
share of CRLD gate decisions (tau_w on the weak view, tau_s on the strong view) that flip.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from training.cli import run_main
from training.teacher_cache import CacheError, compress_topk, epoch_dir, from_storage, read_meta, rebuild_topk


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--k", default="5,10,20")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--tau-w", type=float, default=0.9)
    ap.add_argument("--tau-s", type=float, default=0.2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    meta = read_meta(args.cache)
    if meta is None:
        raise CacheError(f"{args.cache}: not a teacher cache (no meta.json)")
    fp = meta["fingerprint"]
    if fp["topk"]:
        raise CacheError(f"{args.cache}: a top-{fp['topk']} cache; measure on a full one (--topk 0)")
    z = torch.cat([from_storage(np.load(os.path.join(epoch_dir(args.cache, e), "logits.npy")), fp["precision"])
                   .float() for e in range(meta["epochs"])])  # (N * E, 2, C)
    c, t = z.shape[-1], args.temperature
    p_full = F.log_softmax(z / t, -1)
    conf = F.softmax(z, -1).amax(-1)
    gate = torch.stack([conf[:, 0] >= args.tau_w, conf[:, 1] >= args.tau_s], 1)
    rows = []
    for k in [int(x) for x in args.k.split(",")]:
        if not 0 < k < c:
            raise CacheError(f"--k {k}: must be in [1, {c - 1}] for {c} classes")
        r = rebuild_topk(*compress_topk(z, k, t), c)
        kl = (p_full.exp() * (p_full - F.log_softmax(r / t, -1))).sum(-1)
        conf_r = F.softmax(r, -1).amax(-1)
        gate_r = torch.stack([conf_r[:, 0] >= args.tau_w, conf_r[:, 1] >= args.tau_s], 1)
        rows.append({"k": k, "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
                     "confidence_abs_err_max": (conf_r - conf).abs().max().item(),
                     "gate_flip_rate": (gate_r != gate).float().mean().item(),
                     "bytes_per_row_fp16": 2 * (k * 2 + k * 2 + 4)})
    print(f"{args.cache}: {z.shape[0]} rows x 2 views x {c} classes, T={t}, teacher {fp['teacher']}")
    print(f"{'k':>4} {'KL mean':>10} {'KL max':>10} {'conf err max':>13} {'gate flips':>11}")
    for r in rows:
        print(f"{r['k']:>4} {r['kl_mean']:>10.2e} {r['kl_max']:>10.2e} {r['confidence_abs_err_max']:>13.2e} "
              f"{r['gate_flip_rate']:>11.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cache": args.cache, "temperature": t, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(run_main(main))
