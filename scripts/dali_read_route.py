"""How DALI should get its input: measured, not assumed (docs/benchmarks.md, "DALI: how the bytes get in").

    .venv/bin/python scripts/dali_read_route.py --data data/jpeg_bench3k/train --batches 30 [--json OUT]

JPEG folders: DALI's own file reader (`fn.readers.file`, C++ threads) against our Python feeder
(`fn.external_source` with bytes read by `pipelines.sources.read_bytes`, which the `dali` backend uses
because it also hands DALI each sample's crop boxes), both decoding on the CPU and resizing to 224.
Array datasets (CIFAR-like 32x32 uint8): `external_source` of the arrays against the other route the
issue names, an exported image folder (lossless PNG) read back with the file reader and decoded.
Prints samples/s per route (median of --repeat rounds).
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from pipelines.sources import FolderSource, read_bytes


class _Bytes:
    def __init__(self, files, batch, arrays=None):
        self.files, self.batch, self.arrays, self.pos = files, batch, arrays, 0

    def __call__(self):
        idx = [(self.pos + k) % len(self.files) for k in range(self.batch)]
        self.pos += self.batch
        if self.arrays is not None:
            return [self.arrays[i] for i in idx]
        return [read_bytes(self.files[i]) for i in idx]


@pipeline_def
def _reader_pipe(files, size):
    jpegs, _ = fn.readers.file(files=files, random_shuffle=False, name="r")
    return fn.resize(fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), size=[size, size]) \
        if size else fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


@pipeline_def
def _feeder_pipe(feeder, size, encoded):
    data = fn.external_source(source=feeder, batch=True, dtype=types.UINT8, ndim=1 if encoded else 3)
    if not encoded:
        return data
    img = fn.decoders.image(data, device="cpu", output_type=types.RGB)
    return fn.resize(img, size=[size, size]) if size else img


def _rate(pipe, batch, batches, warmup, repeat):
    pipe.build()
    for _ in range(warmup):
        pipe.run()
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        rates.append(batch * batches / (time.perf_counter() - t0))
    return float(np.median(rates)), rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder of class folders of JPEGs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    files = FolderSource(a.data).files
    kw = dict(batch_size=a.batch_size, num_threads=a.threads, device_id=None, prefetch_queue_depth=2, seed=0)
    out = {}
    out["jpeg_file_reader"] = _rate(_reader_pipe(files, 224, **kw), a.batch_size, a.batches, a.warmup, a.repeat)
    out["jpeg_external_source"] = _rate(_feeder_pipe(_Bytes(files, a.batch_size), 224, True, **kw), a.batch_size,
                                        a.batches, a.warmup, a.repeat)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(1024)]
    out["arrays_external_source"] = _rate(_feeder_pipe(_Bytes(arrays, a.batch_size, arrays), None, False, **kw),
                                          a.batch_size, a.batches * 4, a.warmup, a.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        pngs = []
        for k, arr in enumerate(arrays):
            pngs.append(os.path.join(tmp, f"{k:05d}.png"))
            Image.fromarray(arr).save(pngs[-1])
        out["arrays_png_folder_file_reader"] = _rate(_reader_pipe(pngs, None, **kw), a.batch_size, a.batches * 4,
                                                     a.warmup, a.repeat)
    for name, (med, rounds) in out.items():
        print(f"{name:32s} {med:9.0f} samples/s   rounds {', '.join(f'{r:.0f}' for r in rounds)}")
    if a.json:
        json.dump([{"route": k, "samples_per_s": m, "rounds": r, "batch_size": a.batch_size,
                    "threads": a.threads} for k, (m, r) in out.items()], open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
