"""A CIFAR-shaped dataset of random pixels in the official 'python version' layout, for measuring the data path
and the step at CIFAR's size where the real archive is not at hand (no downloads here).

    python datasets_prep/make_cifar_like.py --out /tmp/cifar_like [--train 50000] [--test 10000] [--classes 100]

Writes OUT/cifar-100-python/{train,test,meta} (or, with --classes 10, OUT/cifar-10-batches-py/{data_batch_1..5,
test_batch,batches.meta}) atomically: a temp folder renamed at the end. The files are pickled as the official
archives were (Python 2's cPickle, protocol 2): every string a Python 2 `str`, the pixels a numpy array whose raw
bytes are one such string, so that readers of the real archive read them the same way: torchvision
(`pickle.load(f, encoding="latin1")`: str keys) and the CIFAR page's own recipe (`encoding="bytes"`: bytes keys).
A Python 3 pickle of bytes keys would load with bytes keys under either encoding, which torchvision cannot read.
"""
import argparse
import os
import sys
import pickle
import struct

import numpy as np

from common.files import atomic_folder
from training.cli import run_main

FOLDER = {100: "cifar-100-python", 10: "cifar-10-batches-py"}
_RECONSTRUCT = np.zeros(0, np.uint8).__reduce__()[0]


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with Python 2's string opcodes: `bytes` are written as a Python 2 `str` (which Python 3 loads
    as `str` under encoding="latin1" and as `bytes` under encoding="bytes"), and numpy arrays and dtypes as
    numpy 1.x under Python 2 reduced them (`numpy.core.multiarray._reconstruct`, the raw data as one string).
    The pure-Python pickler, since the C one cannot be told which opcodes to write."""
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:  # by the module name of numpy 1.x, which numpy 2 still resolves
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            assert obj.dtype == np.uint8 and obj.flags.c_contiguous
            return (_RECONSTRUCT, (np.ndarray, (0,), b"b"),
                    (1, obj.shape, obj.dtype, False, obj.tobytes()))
        if isinstance(obj, np.dtype):
            assert obj == np.uint8
            return np.dtype, (b"u1", 0, 1), (3, b"|", None, None, None, -1, -1, 0)
        return NotImplemented


def _dump(obj, path: str):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _batch(label: str, data: np.ndarray, labels: dict, stem: str) -> dict:
    n = len(data)
    d = {b"batch_label": label.encode(), b"data": data,
         b"filenames": [f"{stem}_{i:06d}.png".encode() for i in range(n)]}
    d.update({k.encode(): [int(x) for x in v] for k, v in labels.items()})
    return d


def make_cifar_like(out: str, train: int = 50_000, test: int = 10_000, seed: int = 0, classes: int = 100) -> str:
    if classes not in FOLDER:
        raise ValueError(f"classes must be 10 or 100, not {classes}")
    final = os.path.join(out, FOLDER[classes])
    if os.path.isdir(final):
        return out
    rng = np.random.default_rng(seed)
    with atomic_folder(final) as tmp:
        for split, n in (("train", train), ("test", test)):
            # pixels before labels, per split: the draws of earlier versions of this script
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            fine = rng.integers(0, classes, n)
            if classes == 100:
                label = "training batch 1 of 1" if split == "train" else "testing batch 1 of 1"
                _dump(_batch(label, data, {"fine_labels": fine, "coarse_labels": fine // 5},
                             split), os.path.join(tmp, split))
            elif split == "test":
                _dump(_batch("testing batch 1 of 1", data, {"labels": fine}, "test"),
                      os.path.join(tmp, "test_batch"))
            else:
                # five batches, as the archive: rows split as evenly as the count allows
                for b, rows in enumerate(np.array_split(np.arange(n), 5), 1):
                    _dump(_batch(f"training batch {b} of 5", data[rows], {"labels": fine[rows]},
                                 f"train{b}"), os.path.join(tmp, f"data_batch_{b}"))
        if classes == 100:
            meta = {b"fine_label_names": [f"class_{c:03d}".encode() for c in range(100)],
                    b"coarse_label_names": [f"superclass_{c:02d}".encode() for c in range(20)]}
            _dump(meta, os.path.join(tmp, "meta"))
        else:
            meta = {b"num_cases_per_batch": -(-train // 5), b"label_names": [f"class_{c}".encode() for c in range(10)],
                    b"num_vis": 3072}
            _dump(meta, os.path.join(tmp, "batches.meta"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--classes", type=int, choices=sorted(FOLDER), default=100)
    a = ap.parse_args(argv)
    print(make_cifar_like(a.out, a.train, a.test, classes=a.classes))


if __name__ == "__main__":
    sys.exit(run_main(main))
