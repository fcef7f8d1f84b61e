"""Materialise the embedded demo dataset: scikit-learn's handwritten digits (real data shipped with
the package), rendered as 32x32 RGB images and split 80/20 (stratified) into train and test.

    python datasets_prep/make_demo.py --out data/demo

Writes train.npz / test.npz (`images` uint8 NHWC, `labels` int64) and meta.json (class names,
per-channel mean/std of the training split). Written to a temporary folder, then renamed.
`make_demo_subset` writes a copy whose training split is the subset `data.subset=N` selects, for backends
that read a converted file whole (`demo.py --quick --pipeline ffcv`).
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from common.files import atomic_folder
from pipelines.sources import demo_source, subset
from training.cli import run_main


def render(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """8x8 intensities (0..16) -> 32x32 RGB: bicubic upsampling to 24x24, a 4-pixel border, and a
    random foreground/background colour pair per image so colour ops have something to act on."""
    out = np.empty((len(digits), 32, 32, 3), dtype=np.uint8)
    for k, d in enumerate(digits):
        a = Image.fromarray((d * (255.0 / 16.0)).astype(np.uint8)).resize((24, 24), Image.BICUBIC)
        alpha = np.zeros((32, 32, 1), dtype=np.float32)
        alpha[4:28, 4:28, 0] = np.asarray(a, dtype=np.float32) / 255.0
        fg = rng.uniform(150, 255, size=3)
        bg = rng.uniform(0, 90, size=3)
        out[k] = np.clip(bg * (1 - alpha) + fg * alpha + rng.normal(0, 4, (32, 32, 3)), 0, 255).astype(np.uint8)
    return out


def make_demo(out: str, seed: int = 0) -> str:
    if all(os.path.isfile(os.path.join(out, f)) for f in ("train.npz", "test.npz", "meta.json")):
        return out  # already complete (written atomically)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = render(digits.images, rng)
    labels = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=seed)
    mean = (xtr.reshape(-1, 3).mean(0) / 255.0).round(4).tolist()
    std = (xtr.reshape(-1, 3).std(0) / 255.0).round(4).tolist()
    return _write(out, (xtr, ytr), (xte, yte), {"source": "sklearn.datasets.load_digits",
                                                 "classes": [str(i) for i in range(10)], "mean": mean, "std": std,
                                                 "train": len(ytr), "test": len(yte), "seed": seed})


def make_demo_subset(src: str, out: str, n: int) -> str:
    """A copy of the demo set in `src` whose training split is the `n` images `data.subset=n` trains on (the
    same evenly strided selection, in the same order); the test split and meta.json's class names and mean/std
    (those of the whole training split, as a run with data.subset normalises with) are unchanged. For a backend
    that reads a converted file whole: ffcv refuses data.subset. An existing copy of the same subset is reused."""
    meta_path = os.path.join(out, "meta.json")
    if all(os.path.isfile(os.path.join(out, f)) for f in ("train.npz", "test.npz", "meta.json")):
        with open(meta_path) as f:
            if json.load(f).get("subset_of") == [os.path.abspath(src), n]:
                return out
    train, test = subset(demo_source(src, True), n), demo_source(src, False)
    with open(os.path.join(src, "meta.json")) as f:
        meta = json.load(f)
    meta.update(train=len(train.labels), subset_of=[os.path.abspath(src), n])
    return _write(out, (train.images, train.labels), (test.images, test.labels), meta)


def _write(out: str, train, test, meta: dict) -> str:
    """train.npz, test.npz ((images, labels) each) and meta.json into a temporary folder, renamed to `out`."""
    with atomic_folder(out) as tmp:
        for name, (images, labels) in (("train", train), ("test", test)):
            np.savez(os.path.join(tmp, f"{name}.npz"), images=images, labels=labels)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"demo dataset ready in {make_demo(args.out, args.seed)}")


if __name__ == "__main__":
    sys.exit(run_main(main))
