"""Start-up cost of the image-size table (`pipelines.sources.image_sizes`) without and with its on-disk cache
(docs/benchmarks.md, "The image-size table `dali` builds at start-up").

    .venv/bin/python scripts/size_table_cache.py --data data/jpeg_bench3k/train --rounds 9 [--json OUT]

Each round, alternating: the table with the cache off (every header read), a cold start (no cache file:
every header read, stat'ed and the cache written) and a warm start (every file stat'ed, no header read).
The files are read once first, so the page cache is warm for every variant. Prints the median seconds and
microseconds per file of each, then the cost of loading and storing a table of --table-rows synthetic rows
(ImageNet's training split by default), which grows with the file count and not with the images.
`<data>/.crld_sizes.npz` is deleted before each cold start and at the end.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from pipelines import size_table
from pipelines.sources import FolderSource, image_sizes


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def folder_rounds(data: str, rounds: int):
    src, cache = FolderSource(data), size_table.cache_paths(data)[0]
    for f in src.files:
        with open(f, "rb") as fh:
            fh.read()
    times = {"no_cache": [], "cold": [], "warm": []}
    for _ in range(rounds):
        t, ref = _timed(lambda: image_sizes(src, cache=False))
        times["no_cache"].append(t)
        if os.path.exists(cache):
            os.unlink(cache)
        for k in ("cold", "warm"):
            t, got = _timed(lambda: image_sizes(src))
            assert np.array_equal(got, ref), k
            times[k].append(t)
    cache_bytes = os.path.getsize(cache)
    os.unlink(cache)
    n = len(src.files)
    return [dict(variant=k, files=n, median_s=statistics.median(v), us_per_file=statistics.median(v) / n * 1e6,
                 rounds=v, cache_bytes=cache_bytes) for k, v in times.items()]


def table_io(rows: int):
    root = tempfile.mkdtemp()
    try:
        per = rows // 1000 + 1
        files = [f"{root}/n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(1000) for i in range(per)][:rows]
        rng = np.random.default_rng(0)
        stat = np.stack([rng.integers(10_000, 200_000, rows), rng.integers(1.7e18, 1.8e18, rows)], 1)
        hw = rng.integers(100, 500, (rows, 2))
        out = {"rows": rows}
        out["relative_names_s"], names = _timed(lambda: size_table.relative_names(files, root))
        out["store_s"], path = _timed(lambda: size_table.store(root, names, stat, hw))
        out["load_same_list_s"], _ = _timed(lambda: size_table.load(root, names))
        changed = names[:5] + ["n00000000/new.JPEG"] + names[5:]
        out["load_changed_list_s"], _ = _timed(lambda: size_table.load(root, changed))
        out["cache_bytes"] = os.path.getsize(path)
        os.unlink(path)
        return out
    finally:
        os.rmdir(root)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/jpeg_bench3k/train")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--table-rows", type=int, default=1_281_167)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    recs = folder_rounds(args.data, args.rounds)
    for r in recs:
        print(f"{r['variant']:>8}: {r['median_s']:.3f} s median of {args.rounds} ({r['us_per_file']:.0f} us per "
              f"file; min {min(r['rounds']):.3f}, max {max(r['rounds']):.3f})")
    io = table_io(args.table_rows)
    print(", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in io.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"folder": recs, "table_io": io}, f, indent=1)


if __name__ == "__main__":
    main()
