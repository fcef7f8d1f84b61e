"""Write an ImageNet-like JPEG ImageFolder (train/ and val/) for benchmarks and tests.

    python datasets_prep/make_jpeg_folder.py --out data/jpeg_bench --train 512 --val 64 --classes 8

Images are synthetic but photo-like for a JPEG codec: smooth colour fields, edges and fine texture
(default 500x375 at quality 90, ~100 KB each, close to ImageNet's average file). The source is
the demo digits blown up and recoloured, so classes are still learnable. Written to a temporary
folder, then renamed.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

from common.files import atomic_folder
from training.cli import run_main


def photo_like(digit: np.ndarray, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    base = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.float32)
    shape = np.asarray(Image.fromarray((digit * 15).astype(np.uint8)).resize((w // 2, h // 2), Image.BICUBIC),
                       dtype=np.float32)[..., None] / 255.0
    y0, x0 = int(rng.integers(0, h - h // 2)), int(rng.integers(0, w - w // 2))
    fg = rng.uniform(0, 255, 3)
    img[y0:y0 + h // 2, x0:x0 + w // 2] = img[y0:y0 + h // 2, x0:x0 + w // 2] * (1 - shape) + fg * shape
    img += rng.normal(0, 20, img.shape)  # sensor-like texture keeps the entropy realistic
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_jpeg_folder(out: str, train: int = 512, val: int = 64, classes: int = 8, size=(500, 375),
                     quality: int = 90, seed: int = 0, unique: int = 0) -> str:
    """`unique` > 0: only that many training images (rounded up to whole classes) are encoded; training image
    i beyond them is a hard link to image i % unique (same class), so a large set for timing whole epochs
    costs seconds to make. Loaders still read every file by its own name."""
    if os.path.isfile(os.path.join(out, ".complete")):
        return out
    # imported here: scikit-learn costs ~2 s to import, and `python -m bench` imports this module for every run
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    unique = -(-unique // classes) * classes
    with atomic_folder(out) as tmp:
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                c = i % classes
                folder = os.path.join(tmp, split, f"class_{c:03d}")
                os.makedirs(folder, exist_ok=True)
                if split == "train" and 0 < unique <= i:
                    os.link(os.path.join(folder, f"{i % unique:06d}.jpg"), os.path.join(folder, f"{i:06d}.jpg"))
                    continue
                d = digits.images[rng.choice(np.flatnonzero(digits.target == c))]
                photo_like(d, *size, rng).save(os.path.join(folder, f"{i:06d}.jpg"), quality=quality)
        open(os.path.join(tmp, ".complete"), "w").close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/jpeg_bench")
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--unique", type=int, default=0, help="encode only this many training images, hard-link the rest")
    a = ap.parse_args()
    out = make_jpeg_folder(a.out, a.train, a.val, a.classes, (a.width, a.height), a.quality, unique=a.unique)
    sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs if f.endswith(".jpg")]
    print(f"{out}: {len(sizes)} JPEGs, mean {np.mean(sizes) / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(run_main(main))
