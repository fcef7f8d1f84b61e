"""Convert a dataset split to an FFCV `.beton` file plus a JSON sidecar the loader checks.

    python datasets_prep/prep_ffcv.py --format imagefolder --src data/imagenet --split train \
        --out data/ffcv/imagenet_train.beton            # ImageNet defaults: max side 512, proportion 0.5, q90
    python datasets_prep/prep_ffcv.py --format cifar --src data/cifar100 --split test --out data/ffcv/c100_test.beton
    python datasets_prep/prep_ffcv.py --format demo --src data/demo --split train --out data/ffcv/demo_train.beton

Defaults per format: imagefolder (ImageNet, Tiny-ImageNet): --max-resolution 512 --write-mode proportion
--compress-probability 0.5 --jpeg-quality 90 (FFCV's ImageNet recipe; use --max-resolution 64 --write-mode
raw for Tiny-ImageNet); cifar and demo: raw 32x32 pixels, no resizing.

The .beton is written under a temporary name and renamed when complete; the sidecar (FILE.beton.json:
source, class names in order, counts per class, settings, skipped files, byte size, the source's digest)
is written last, also atomically, so a file without its sidecar is incomplete. The sidecar identifies the
data: training with `--pipeline ffcv` needs only the .beton files and their sidecars. Re-running with the
same arguments over a complete output does nothing unless --overwrite. A corrupt image stops the conversion
with a last line naming it and no output (or, with --skip-bad-images, is left out, logged and counted in the
sidecar). A conversion that cannot fit (its size is estimated from a sample of image headers) is refused up
front; a write that fails anyway (a full disk, a writer process that died) is a one-line error, and the temp
file is removed.
"""
import argparse
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from common.files import atomic_path, save_atomic
from common.forking import fork_safely
from pipelines.sources import DataError, FolderSource, cifar_classes_in, cifar_source, demo_source, header_hw
from training.cli import run_main
from training.teacher_cache import dataset_digest

log = logging.getLogger("prep_ffcv")
SIDECAR_VERSION = 1
DEFAULTS = {  # per --format: max_resolution, write_mode
    "imagefolder": (512, "proportion"),
    "cifar": (None, "raw"),
    "demo": (None, "raw"),
}


class _Samples:
    """Indexable (image, label) for FFCV's writer. A decode failure never raises inside the
    writer's worker processes (FFCV would wait forever for them): it is recorded in a side file and
    a placeholder is written, and the conversion fails afterwards naming the file."""

    def __init__(self, source, keep, bad_log):
        self.source, self.keep, self.bad_log = source, keep, bad_log

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, k):
        i = self.keep[k]
        label = int(self.source.labels[i])
        if hasattr(self.source, "images"):
            return self.source.images[i], label
        try:
            img, label = self.source.load_sample(i)  # a skip-mode substitute carries its own label
            return np.asarray(img), label
        except Exception as e:  # noqa: BLE001 - reported after the writer finishes
            with open(self.bad_log, "a") as f:
                f.write(f"{self.source.files[i]}\t{type(e).__name__}: {str(e).splitlines()[0]}\n")
            return np.zeros((8, 8, 3), dtype=np.uint8), label


def open_split(fmt, src, split, num_classes=None, skip_bad=False, allow_empty=False):
    if not os.path.isdir(src) or not os.listdir(src):
        raise DataError(f"--src {src}: missing or empty folder")
    train = split == "train"
    if fmt == "imagefolder":
        sub = os.path.join(src, split)
        if not os.path.isdir(sub):
            raise DataError(f"{sub}: missing split folder (expected {src}/train and {src}/val)")
        return FolderSource(sub, skip_bad=skip_bad, name="imagefolder", allow_empty=allow_empty)
    if fmt == "cifar":
        if num_classes is None:  # from the pickles present: a folder name like cifar-100-python contains "10"
            num_classes = cifar_classes_in(src)
            if num_classes is None:
                raise DataError(f"--src {src}: no CIFAR-10 (data_batch_1, batches.meta) or CIFAR-100 "
                                f"(train, meta) pickles here or in cifar-10-batches-py / cifar-100-python")
        return cifar_source(src, train, num_classes)
    return demo_source(src, train)


def _prescan(source, workers):
    """--skip-bad-images: decode everything once, in parallel, and keep the readable ones."""
    with fork_safely(), ProcessPoolExecutor(max(1, workers)) as ex:
        ok = list(ex.map(_readable, source.files, chunksize=64))
    bad = [f for f, good in zip(source.files, ok) if not good]
    for f in bad:
        log.warning("skipping unreadable image %s", f)
    return [i for i, good in enumerate(ok) if good], bad


def _readable(path):
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
        return True
    except Exception:  # noqa: BLE001
        return False


def settings_of(args) -> dict:
    return {"format": args.format, "split": args.split, "max_resolution": args.max_resolution,
            "write_mode": args.write_mode, "compress_probability": args.compress_probability,
            "jpeg_quality": args.jpeg_quality, "skip_bad_images": args.skip_bad_images}


def is_complete(out: str, settings: dict, src: str) -> bool:
    side = out + ".json"
    if not (os.path.isfile(out) and os.path.isfile(side)):
        return False
    try:
        meta = json.load(open(side))
    except (OSError, ValueError):
        return False
    return (meta.get("settings") == settings and meta.get("source") == os.path.abspath(src)
            and meta.get("beton_bytes") == os.path.getsize(out))


def convert(args) -> dict:
    out = os.path.abspath(args.out)
    settings = settings_of(args)
    if is_complete(out, settings, args.src) and not args.overwrite:
        log.info("%s is complete and up to date (use --overwrite to rebuild)", out)
        return json.load(open(out + ".json"))
    if os.path.exists(out) and not args.overwrite:
        raise DataError(f"{out} exists with other settings or is incomplete; use --overwrite")
    out_dir = os.path.dirname(out)
    try:  # a real write: os.access says yes to root even on a read-only mount or a path through a file
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise DataError(f"{out_dir}: output folder is not writable ({e.strerror or e})") from None
    for stale in glob.glob(out + ".tmp-*"):  # left by a killed conversion
        os.remove(stale)
    source = open_split(args.format, args.src, args.split, args.num_classes, args.skip_bad_images,
                        args.allow_empty_classes)
    keep, skipped = list(range(len(source))), list(getattr(source, "skipped", []))  # non-image files
    if args.skip_bad_images and hasattr(source, "files"):
        keep, undecodable = _prescan(source, args.num_workers)
        skipped += undecodable
        if not keep:
            raise DataError(f"--src {args.src}: none of the {len(source)} images of the {args.split} split decodes")
    _check_space(source, keep, out_dir, args)

    from ffcv.fields import IntField, RGBImageField

    from datasets_prep.ffcv_writer import CheckedDatasetWriter
    # a killed conversion leaves its temporary file (and bad-image log) for the stale clean-up above
    with atomic_path(out, prefix=os.path.basename(out) + ".tmp-") as tmp:
        bad_log = tmp + ".bad"
        try:
            t0 = time.time()
            writer = CheckedDatasetWriter(tmp, {
                "image": RGBImageField(write_mode=args.write_mode, max_resolution=args.max_resolution,
                                       compress_probability=args.compress_probability,
                                       jpeg_quality=args.jpeg_quality),
                "label": IntField()}, num_workers=args.num_workers)
            try:
                writer.from_indexed_dataset(_Samples(source, keep, bad_log), chunksize=args.chunk_size)
            except OSError as e:  # ENOSPC in this process, or a writer process that died of it
                raise DataError(f"{out}: writing failed ({e.strerror or e}; "
                                f"{shutil.disk_usage(out_dir).free / 2**30:.1f} GiB free in {out_dir}); "
                                f"no output written") from None
            seconds = time.time() - t0
            if os.path.exists(bad_log):
                first = open(bad_log).readline().rstrip("\n").split("\t")
                raise DataError(f"{first[0]}: cannot decode image ({first[1]}); no output written "
                                f"(use --skip-bad-images to leave such files out)")
        finally:
            if os.path.exists(bad_log):
                os.remove(bad_log)
    labels = source.labels[keep]
    meta = {"sidecar_version": SIDECAR_VERSION, "dataset": source.name, "source": os.path.abspath(args.src),
            "settings": settings, "num_samples": len(keep), "num_classes": len(source.classes),
            "classes": list(source.classes),
            "counts_per_class": np.bincount(labels, minlength=len(source.classes)).tolist(),
            "skipped": skipped, "skipped_count": len(skipped), "beton_bytes": os.path.getsize(out),
            "source_sha256": dataset_digest(source),  # the data's identity when only the .beton is kept
            "mean_std": [list(source.mean_std[0]), list(source.mean_std[1])],
            "images_per_s": len(keep) / max(seconds, 1e-9), "ffcv": "1.0.2"}
    save_atomic(out + ".json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def estimate_bytes(source, keep, args, probe=256) -> int:
    """Expected .beton size: raw pixels after --max-resolution for the raw share, the source's JPEG bytes
    (scaled by area) for the compressed share, from the headers of up to `probe` evenly spread files."""
    pages = args.num_workers * 8 * 2**20  # each writer process's last, partly filled 8 MiB page
    if hasattr(source, "images"):
        return source.images[0].nbytes * len(keep) + pages
    picks = [keep[k] for k in np.linspace(0, len(keep) - 1, num=min(probe, len(keep))).round().astype(int)]
    raw = jpg = 0.0
    for i in picks:
        h, w = header_hw(source.files[i])
        scale = min(1.0, args.max_resolution / max(h, w)) if args.max_resolution else 1.0
        raw += round(h * scale) * round(w * scale) * 3
        jpg += os.path.getsize(source.files[i]) * scale * scale
    raw_share = {"raw": 1.0, "jpg": 0.0, "smart": 1.0, "proportion": 1 - args.compress_probability}[args.write_mode]
    return int(len(keep) / len(picks) * (raw_share * raw + (1 - raw_share) * jpg)) + pages


def _check_space(source, keep, out_dir, args):
    """Refuse up front when the output cannot fit, rather than fail (cleanly, but late) mid-write."""
    need = estimate_bytes(source, keep, args) * 1.1
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise DataError(f"{out_dir}: not enough free disk space (~{need / 2**30:.1f} GiB needed, "
                        f"{free / 2**30:.1f} GiB free)")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--format", required=True, choices=sorted(DEFAULTS))
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="train", help="imagefolder: train|val; cifar/demo: train|test (val = test)")
    ap.add_argument("--num-classes", type=int, choices=(10, 100), help="cifar: 10 or 100 (default: detected)")
    ap.add_argument("--max-resolution", type=int, default=-1, help="longest side kept (default per format)")
    ap.add_argument("--write-mode", choices=("raw", "jpg", "proportion", "smart"), default=None)
    ap.add_argument("--compress-probability", type=float, default=0.5)
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk-size", type=int, default=100)
    ap.add_argument("--skip-bad-images", action="store_true")
    ap.add_argument("--allow-empty-classes", action="store_true", help="convert although a class folder is empty")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    res, mode = DEFAULTS[args.format]
    args.max_resolution = res if args.max_resolution == -1 else (args.max_resolution or None)
    args.write_mode = args.write_mode or mode
    if args.format != "imagefolder" and args.split == "val":
        args.split = "test"
    if args.split not in ("train", "val", "test"):
        ap.error(f"--split {args.split}: use train, val or test")
    if args.format == "imagefolder" and args.split == "test":
        args.split = "val"
    if not 0 <= args.compress_probability <= 1 or not 1 <= args.jpeg_quality <= 100:
        ap.error("--compress-probability must be in [0, 1] and --jpeg-quality in [1, 100]")
    return args


def main(argv=None):
    args = parse(argv)
    meta = convert(args)
    print(f"{args.out}: {meta['num_samples']} images, {meta['num_classes']} classes, "
          f"{meta['beton_bytes'] / 2**20:.1f} MiB, skipped {meta['skipped_count']}")
    return meta


if __name__ == "__main__":
    sys.exit(run_main(main))
