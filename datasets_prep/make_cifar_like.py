"""A CIFAR-100-shaped dataset of random pixels in the official 'python version' layout, for measuring the data
path and the step at CIFAR's size where the real archive is not at hand (no downloads here).

    python datasets_prep/make_cifar_like.py --out /tmp/cifar_like [--train 50000] [--test 10000]

Writes OUT/cifar-100-python/{train,test,meta} atomically: a temp folder renamed at the end.
"""
import argparse
import os
import pickle

import numpy as np

from pipelines.disk_cache import atomic_folder


def make_cifar_like(out: str, train: int = 50_000, test: int = 10_000, seed: int = 0) -> str:
    final = os.path.join(out, "cifar-100-python")
    if os.path.isdir(final):
        return out
    rng = np.random.default_rng(seed)
    with atomic_folder(final) as tmp:
        for name, n in (("train", train), ("test", test)):
            data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    b"fine_labels": rng.integers(0, 100, n).tolist()}
            with open(os.path.join(tmp, name), "wb") as f:
                pickle.dump(data, f)
        with open(os.path.join(tmp, "meta"), "wb") as f:
            pickle.dump({b"fine_label_names": [f"class_{c:03d}".encode() for c in range(100)]}, f)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    a = ap.parse_args(argv)
    print(make_cifar_like(a.out, a.train, a.test))


if __name__ == "__main__":
    main()
