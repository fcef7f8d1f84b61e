"""Turn the Tiny-ImageNet archive's own layout into the ImageFolder layout every backend reads.

    python datasets_prep/tiny_imagenet.py --src downloads/tiny-imagenet-200 --out data/tiny_imagenet
    python train.py --config configs/tiny_imagenet/crld/res32x4_res8x4.yaml data.root=data/tiny_imagenet ...

The archive (tiny-imagenet-200.zip, unpacked) keeps training images in train/<wnid>/images/ and puts
all validation images in one folder, val/images/, with their classes in val/val_annotations.txt. This
writes out/train/<wnid>/<file> and out/val/<wnid>/<file> as symbolic links (--copy for copies), the
200 classes from wnids.txt. It builds under a temporary name and renames when complete, so an
interrupted run leaves nothing that looks finished; re-running over a complete output does nothing.
The test split has no labels and is left out.
"""
import argparse
import os
import sys

from datasets_prep.folder_layout import materialize
from pipelines.sources import IMG_EXTENSIONS, DataError
from training.cli import run_main

DONE = ".tiny_imagenet_complete"


def _need(path, what):
    if not os.path.exists(path):
        raise DataError(f"{path}: missing ({what}); expected the unpacked tiny-imagenet-200 archive")
    return path


def plan(src):
    """[(source file, split, wnid, name)] for train and val, checked against wnids.txt."""
    with open(_need(os.path.join(src, "wnids.txt"), "the class list")) as f:
        wnids = [w.strip() for w in f if w.strip()]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{src}/wnids.txt: repeated class ids")
    known, todo = set(wnids), []
    train = _need(os.path.join(src, "train"), "training images")
    for w in wnids:
        folder = _need(os.path.join(train, w, "images"), f"training images of class {w}")
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMG_EXTENSIONS))
        if not names:
            raise DataError(f"{folder}: no images")
        todo += [(os.path.join(folder, n), "train", w, n) for n in names]
    ann = _need(os.path.join(src, "val", "val_annotations.txt"), "validation labels")
    with open(ann) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1].strip() not in known:
                raise DataError(f"{ann}:{line_no}: expected '<file>\\t<wnid from wnids.txt>\\t...', got {line[:80]!r}")
            path = os.path.join(src, "val", "images", parts[0].strip())
            todo.append((_need(path, f"listed in {ann}:{line_no}"), "val", parts[1].strip(), parts[0].strip()))
    return wnids, todo


def convert(src, out, copy=False) -> int:
    out = os.path.abspath(out)
    if os.path.isfile(os.path.join(out, DONE)):
        print(f"{out} is complete; nothing to do")
        return 0
    if os.path.exists(out):
        raise DataError(f"{out} exists but is not a completed conversion; remove it first")
    wnids, todo = plan(os.path.abspath(src))
    materialize(out, [os.path.join(split, w) for split in ("train", "val") for w in wnids],
                [(path, os.path.join(split, w, name)) for path, split, w, name in todo], copy, DONE)
    n_val = sum(1 for t in todo if t[1] == "val")
    print(f"{out}: {len(wnids)} classes, {len(todo) - n_val} train and {n_val} val images "
          f"({'copied' if copy else 'linked'})")
    return len(todo)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="the unpacked tiny-imagenet-200 folder")
    ap.add_argument("--out", required=True, help="ImageFolder root to create (train/, val/)")
    ap.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    a = ap.parse_args(argv)
    return convert(a.src, a.out, a.copy)


if __name__ == "__main__":
    sys.exit(run_main(main))
