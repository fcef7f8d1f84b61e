"""Sort ImageNet's official validation split (50,000 flat files) into the class folders every backend reads.

    python datasets_prep/imagenet_val.py --images downloads/imagenet_val --labels LOC_val_solution.csv \
        --classes LOC_synset_mapping.txt --out data/imagenet/val
    python datasets_prep/imagenet_val.py --images downloads/imagenet_val \
        --devkit ILSVRC2012_devkit_t12.tar.gz --out data/imagenet/val

ILSVRC2012_img_val.tar unpacks into ILSVRC2012_val_00000001.JPEG ... ILSVRC2012_val_00050000.JPEG with no
class folders. The labels come from the Kaggle release's LOC_val_solution.csv (`ImageId,PredictionString`;
the prediction string starts with the wnid) or from the ILSVRC2012 devkit: ILSVRC2012_devkit_t12.tar.gz
(checked against torchvision's md5) or the meta.bin torchvision writes from it, read through torchvision's
own parser (torchvision.datasets.imagenet). The known classes are the devkit's 1,000, or `--classes` (a
class list such as LOC_synset_mapping.txt, or the train split's folder); without either, a label must look
like a wnid (n + 8 digits). Every known class gets a folder, so the class list equals the train split's.

Writes OUT/<wnid>/ILSVRC2012_val_*.JPEG as symbolic links (--copy for copies). It builds under a temporary
name beside OUT and renames it when complete; any error (an image without a label, a label for a missing
image, an unknown class) is one line naming it, and leaves nothing behind. Re-running over a complete
output of the same inputs does nothing.
"""
import argparse
import csv
import json
import os
import re
import sys
import tempfile

from datasets_prep.folder_layout import materialize
from pipelines.sources import DataError
from training.cli import run_main

NAME = re.compile(r"(ILSVRC2012_val_(\d{8}))\.JPEG")
WNID = re.compile(r"n\d{8}")
DONE = ".imagenet_val.json"


def scan_images(folder: str) -> dict:
    """stem -> path of the flat validation files in `folder`."""
    if not os.path.isdir(folder):
        raise DataError(f"--images {folder}: not a folder (expected the unpacked ILSVRC2012_img_val.tar)")
    found = {}
    for name in os.listdir(folder):
        m = NAME.fullmatch(name)
        if m:
            found[m.group(1)] = os.path.join(folder, name)
    if not found:
        raise DataError(f"--images {folder}: no ILSVRC2012_val_*.JPEG files (expected the flat, unpacked "
                        f"ILSVRC2012_img_val.tar)")
    return found


def labels_from_csv(path: str) -> dict:
    """stem -> (wnid, 'file:line') from LOC_val_solution.csv."""
    labels = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--labels {path}: cannot read ({e})") from None
    for line, row in enumerate(rows, 1):
        if not row or (line == 1 and row[0] == "ImageId"):
            continue
        words = row[1].split() if len(row) >= 2 else []
        if not words:
            raise DataError(f"{path}:{line}: expected 'ImageId,<wnid> <box>...', got {','.join(row)[:80]!r}")
        if len(set(words[::5])) > 1:
            raise DataError(f"{path}:{line}: {row[0]} has boxes of several classes ({', '.join(sorted(set(words[::5])))})")
        where = f"{path}:{line}"
        stem = row[0].strip()
        if stem in labels and labels[stem][0] != words[0]:
            raise DataError(f"{where}: {stem} labelled {words[0]} here but {labels[stem][0]} at {labels[stem][1]}")
        labels[stem] = (words[0], where)
    return labels


def labels_from_devkit(path: str):
    """(stem -> (wnid, where), the devkit's classes) through torchvision's devkit parser."""
    from torchvision.datasets import imagenet as tv
    try:
        if path.endswith(".bin"):
            wnid_to_classes, val_wnids = tv.load_meta_file(os.path.dirname(os.path.abspath(path)),
                                                            os.path.basename(path))
        else:
            with tempfile.TemporaryDirectory() as tmp:  # torchvision writes meta.bin beside the archive
                name = tv.ARCHIVE_META["devkit"][0]
                os.symlink(os.path.abspath(path), os.path.join(tmp, name))
                tv.parse_devkit_archive(tmp, name)
                wnid_to_classes, val_wnids = tv.load_meta_file(tmp)
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, tarfile and scipy their own
        raise DataError(f"--devkit {path}: not a readable ILSVRC2012 devkit archive or meta.bin "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    where = f"{path} (ground truth line %d)"
    labels = {f"ILSVRC2012_val_{i:08d}": (w, where % i) for i, w in enumerate(val_wnids, 1)}
    return labels, sorted(wnid_to_classes)


def read_classes(path: str) -> list:
    """Class ids from a folder's subfolders (a train split) or a file's first word per line."""
    if os.path.isdir(path):
        return sorted(d.name for d in os.scandir(path) if d.is_dir())
    try:
        with open(path) as f:
            return sorted({line.split()[0] for line in f if line.strip()})
    except OSError as e:
        raise DataError(f"--classes {path}: cannot read ({e.strerror or e})") from None


def plan(images: dict, labels: dict, known, labels_from: str):
    """(class folders, [(source, OUT-relative destination)]) after checking that every image has a label,
    every label an image, and every label is a known class."""
    for stem in sorted(images):
        if stem not in labels:
            raise DataError(f"{images[stem]}: no label for this image in {labels_from}")
    folder = os.path.dirname(next(iter(images.values())))
    for stem, (wnid, where) in sorted(labels.items()):
        if stem not in images:
            raise DataError(f"{where}: {stem} has no image {stem}.JPEG in {folder}")
        if (wnid not in known) if known is not None else not WNID.fullmatch(wnid):
            raise DataError(f"{where}: unknown class '{wnid}' for {stem}"
                            + (f" (not among the {len(known)} classes)" if known is not None else
                               " (not a wnid: n + 8 digits)"))
    classes = sorted(known) if known is not None else sorted({w for w, _ in labels.values()})
    return classes, [(images[s], os.path.join(w, os.path.basename(images[s]))) for s, (w, _) in labels.items()]


def convert(images: str, out: str, labels: str = None, devkit: str = None, classes: str = None,
            copy: bool = False) -> int:
    """Sort the flat split into OUT/<wnid>/; returns the number of images (0: already complete)."""
    out = os.path.abspath(out)
    inputs = {"images": os.path.abspath(images), "labels": os.path.abspath(labels or devkit),
              "classes": os.path.abspath(classes) if classes else None, "copy": copy}
    marker = os.path.join(out, DONE)
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if {k: done.get(k) for k in inputs} == inputs:
            print(f"{out} is complete; nothing to do")
            return 0
        raise DataError(f"{out}: holds a conversion of other inputs ({done.get('images')}, {done.get('labels')}); "
                        f"remove it first")
    if os.path.exists(out):
        raise DataError(f"{out} exists but is not a completed conversion; remove it first")
    found = scan_images(images)
    if devkit:
        label_map, known = labels_from_devkit(devkit)
    else:
        label_map, known = labels_from_csv(labels), None
    if classes:
        known = read_classes(classes)
        if not known:
            raise DataError(f"--classes {classes}: no class ids found")
    folders, files = plan(found, label_map, known, labels or devkit)
    materialize(out, folders, files, copy, DONE, json.dumps({**inputs, "num_images": len(files),
                                                              "num_classes": len(folders)}, indent=1))
    print(f"{out}: {len(files)} images in {len(folders)} class folders ({'copied' if copy else 'linked'})")
    return len(files)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--images", required=True, help="folder of the flat ILSVRC2012_val_*.JPEG files")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="LOC_val_solution.csv (ImageId,PredictionString)")
    src.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz, or torchvision's meta.bin made from it")
    ap.add_argument("--classes", help="known class ids: LOC_synset_mapping.txt, a wnid list, or the train folder")
    ap.add_argument("--out", required=True, help="the validation split to create (e.g. data/imagenet/val)")
    ap.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    a = ap.parse_args(argv)
    return convert(a.images, a.out, a.labels, a.devkit, a.classes, a.copy)


if __name__ == "__main__":
    sys.exit(run_main(main))
