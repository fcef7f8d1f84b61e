"""Dataset sources shared by every backend: ImageFolder trees, CIFAR python pickles, the demo set.

A source is an indexable list of (image, label); `index` is the position in this canonical order
(sorted class folders and file names; pickle order for CIFAR; file order for the demo). Every
backend reports that same index with each sample.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from common.errors import UserError
from pipelines import size_table

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# (mean, std) in [0, 1] units.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def read_bytes(path: str) -> np.ndarray:
    """A file's bytes as a writable uint8 array. An unbuffered readinto releases the GIL during the read
    (np.fromfile holds it: with every core busy decoding, a preempted reader stalled the view threads)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        n = f.readinto(buf)
    return np.frombuffer(buf, dtype=np.uint8, count=n)


# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): they carry the size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_hw(raw: np.ndarray) -> Optional[Tuple[int, int]]:
    """(height, width) from a JPEG's frame header, or None when `raw` is not a parseable JPEG. Walks the
    marker segments of bytes already read, far cheaper than opening the file with PIL for its size."""
    b = raw[:1 << 17].tobytes()
    if b[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(b)
    while i + 9 <= n:
        if b[i] != 0xFF:
            return None
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
        elif m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
        elif m in _SOF:
            return (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
        else:
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


def header_hw(path: str) -> Tuple[int, int]:
    """(height, width) from the file's header: the one image-size reader (the size table, prep_ffcv's
    estimate). A JPEG without its end-of-image marker near the end
    (truncated, most often) must also decode in PIL: DALI's CPU decoder can fault on a truncated file
    instead of reporting it, so it never gets one."""
    with open(path, "rb", buffering=0) as f:
        head = f.read(1 << 17)
        size = os.fstat(f.fileno()).st_size
        # most images fit in the head already read: read the tail only of larger files
        tail = head[-4096:] if size <= len(head) else os.pread(f.fileno(), 4096, size - 4096)
    hw = jpeg_hw(np.frombuffer(head, dtype=np.uint8))
    if hw and hw[0] > 0 and hw[1] > 0 and b"\xff\xd9" in tail:
        return hw
    try:  # other formats (PNG, ...), JPEGs whose frame header lies further in or whose end is missing
        with Image.open(path) as im:
            if hw:
                im.load()
            return im.size[1], im.size[0]
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def image_sizes(source, threads: int = 0, cache: bool = True) -> np.ndarray:
    """(N, 2) int64 height and width of every image of a source, made once when a loader is built (the
    view parameters need them for whole batches at once). Folder sources read each file's header on a
    thread pool (the reads release the GIL). A file whose header cannot be read is 0 x 0 in skip mode
    (the loader substitutes it) and a DataError otherwise. With `cache`, the sizes read are kept on disk
    (`pipelines.size_table`) with each file's size and modification time: a later call reads again only
    the files that changed or are new, and stats the others."""
    if hasattr(source, "images"):
        return np.broadcast_to(np.asarray(source.images.shape[1:3], dtype=np.int64), (len(source), 2))
    files, root = source.files, getattr(source, "root", None)
    cache = cache and root is not None
    names = size_table.relative_names(files, root) if cache else None
    stat, hw = size_table.load(root, names) if cache else (None, np.zeros((len(files), 2), dtype=np.int64))
    errors = {}

    def read(i):
        try:
            hw[i] = header_hw(files[i])
        except DataError as e:
            errors[i] = e

    with ThreadPoolExecutor(threads or min(32, 4 * (os.cpu_count() or 1))) as ex:
        stale = np.arange(len(files))
        if cache:
            now = np.empty_like(stat)

            def stat_one(i):
                st = os.stat(files[i])
                now[i] = st.st_size, st.st_mtime_ns
            _map_chunks(ex, stat_one, stale)
            # stat before the header read: a file changed in between has a newer stat than its entry
            stale = np.flatnonzero((now != stat).any(axis=1) | (hw <= 0).any(axis=1))
            stat, hw[stale] = now, 0
        _map_chunks(ex, read, stale)
    if cache and len(stale) > len(errors):
        size_table.store(root, names, stat, hw)
    if errors and not getattr(source, "skip_bad", False):
        raise errors[min(errors)]
    return hw


def _map_chunks(ex, fn, idx: np.ndarray):
    """fn(i) for every i of idx on the pool, in chunks: a task per file costs more than a stat."""
    chunk = 64
    list(ex.map(lambda part: [fn(i) for i in part], (idx[a:a + chunk] for a in range(0, len(idx), chunk))))


class DataError(UserError):
    """A problem with the user's data; the message names the file or folder."""


class ArraySource:
    """In-memory uint8 NHWC images with integer labels (CIFAR, demo)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], mean_std, name: str):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.classes, self.mean_std, self.name = list(classes), mean_std, name

    def __len__(self):
        return len(self.labels)

    def load_sample(self, i: int):
        return Image.fromarray(self.images[i]), int(self.labels[i])


class FolderSource:
    """ImageFolder layout: root/<class>/<image>, classes and files in sorted order."""

    def __init__(self, root: str, classes: Optional[List[str]] = None, skip_bad: bool = False,
                 mean_std=NORMALIZATION["imagenet"], name: str = "imagefolder", allow_empty: bool = False):
        found = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not found:
            raise DataError(f"{root}: no class folders (expected root/<class>/<image>)")
        if classes is not None and found != list(classes):
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise DataError(f"{root}: class folders differ from the training split "
                            f"(missing {missing[:5]}, unexpected {extra[:5]})")
        self.classes, self.mean_std, self.name, self.skip_bad = found, mean_std, name, skip_bad
        self.root = root
        self.files: List[str] = []
        self.skipped: List[str] = []  # non-image files left out in skip mode (prep_ffcv counts them)
        labels = []
        for c, cls in enumerate(found):
            names = sorted(f for f in os.listdir(os.path.join(root, cls)) if not f.startswith("."))
            for f in names:
                path = os.path.join(root, cls, f)
                if not f.lower().endswith(IMG_EXTENSIONS):
                    if skip_bad:
                        log.warning("skipping non-image file %s", path)
                        self.skipped.append(path)
                        continue
                    raise DataError(f"{path}: not an image file (use data.skip_bad_images=true to skip)")
                self.files.append(path)
                labels.append(c)
        if not self.files:
            raise DataError(f"{root}: no images found")
        self.labels = np.asarray(labels, dtype=np.int64)
        empty = [cls for c, cls in enumerate(found) if not np.any(self.labels == c)]
        if empty and not allow_empty:  # as torchvision's ImageFolder: a class that never appears is a mistake
            raise DataError(f"{root}: {len(empty)} class folder(s) hold no images: {', '.join(empty[:5])}"
                            f"{' ...' if len(empty) > 5 else ''} (an interrupted extraction?); "
                            f"data.allow_empty_classes=true (prep_ffcv.py: --allow-empty-classes) keeps them")

    def __len__(self):
        return len(self.files)

    def _open(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises many types for corrupt data
            raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None

    def load_sample(self, i: int) -> Tuple[Image.Image, int]:
        """(image, label); in skip mode a corrupt file's substitute (`first_readable`), label included."""
        if not self.skip_bad:
            return self._open(self.files[i]), int(self.labels[i])
        j, img = first_readable(self.files, i, self._open)
        return img, int(self.labels[j])


def first_readable(files: Sequence[str], i: int, read):
    """Skip mode's substitution, the one rule every backend follows: sample i, or when `read(path)` raises
    DataError for its file, the next sample whose file reads (wrapping around), each skipped file logged.
    Deterministic, so every backend and every run substitutes the same sample. Returns (j, read's result)."""
    for k in range(len(files)):
        j = (i + k) % len(files)
        try:
            return j, read(files[j])
        except DataError as e:
            log.warning("skipping unreadable image: %s", e)
    raise DataError("no readable image in the dataset")


def check_decodable(path: str) -> None:
    """Skip mode's test, once per file per run: whether PIL (the reference) decodes it. A JPEG is decoded
    at 1/8 scale (`draft`): the entropy decoding, where a corrupt file fails, runs in full, for a fraction
    of a full decode (docs/benchmarks.md). A header check alone lets a bad Huffman table through to DALI,
    which then stops the run."""
    try:
        with Image.open(BytesIO(read_bytes(path).tobytes())) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _unpickle(path: str) -> dict:
    """A CIFAR pickle as a dict with bytes keys. The official archives are Python 2 pickles, whose strings load
    as bytes under encoding="bytes" (the CIFAR page's recipe); a Python 3 pickle's keys load as written, bytes
    or str, so str keys are encoded to match."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing CIFAR pickle (expected the 'python version' archive contents)")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"{path}: unreadable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR pickle (a {type(d).__name__}, not a dict)")
    return {k.encode("latin1") if isinstance(k, str) else k: v for k, v in d.items()}


def cifar_classes_in(root: str) -> Optional[int]:
    """10 or 100 from the pickles present (root itself or its cifar-*-py subfolder); None if neither."""
    for d in (root, os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-100-python")):
        if os.path.isfile(os.path.join(d, "data_batch_1")) or os.path.isfile(os.path.join(d, "batches.meta")):
            return 10
        if os.path.isfile(os.path.join(d, "train")) or os.path.isfile(os.path.join(d, "meta")):
            return 100
    return None


def cifar_source(root: str, train: bool, num_classes: int) -> ArraySource:
    """CIFAR-10/100 'python version' folder (root itself or root/cifar-{10-batches,100}-py)."""
    sub = "cifar-100-python" if num_classes == 100 else "cifar-10-batches-py"
    if os.path.isdir(os.path.join(root, sub)):
        root = os.path.join(root, sub)
    if num_classes == 100:
        files, label_key = (["train"] if train else ["test"]), b"fine_labels"
        meta, names_key = "meta", b"fine_label_names"
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key, meta, names_key = b"labels", "batches.meta", b"label_names"
    data, labels = [], []
    for f in files:
        d = _unpickle(os.path.join(root, f))
        missing = [k.decode() for k in (b"data", label_key) if k not in d]
        if missing:
            raise DataError(f"{os.path.join(root, f)}: CIFAR pickle without {missing} (keys: "
                            f"{sorted(k.decode('latin1') if isinstance(k, bytes) else str(k) for k in d)})")
        data.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(d[label_key])
    classes = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(os.path.join(root, meta))[names_key]]
    name = f"cifar{num_classes}"
    return ArraySource(np.ascontiguousarray(np.concatenate(data)), np.asarray(labels), classes,
                       NORMALIZATION[name], name)


def demo_source(root: str, train: bool) -> ArraySource:
    """The embedded demo set written by `datasets_prep/make_demo.py` (npz + meta.json)."""
    path = os.path.join(root, "train.npz" if train else "test.npz")
    meta_path = os.path.join(root, "meta.json")
    for p in (path, meta_path):
        if not os.path.isfile(p):
            raise DataError(f"{p}: missing (create it with: python datasets_prep/make_demo.py --out {root})")
    with np.load(path) as z:
        images, labels = z["images"], z["labels"]
    with open(meta_path) as f:
        meta = json.load(f)
    return ArraySource(images, labels, meta["classes"], (tuple(meta["mean"]), tuple(meta["std"])), "demo")


def open_source(data_cfg, train: bool, train_classes: Optional[List[str]] = None):
    """The configured dataset's train or validation split."""
    root, ds = data_cfg.root, data_cfg.dataset
    if not root or not os.path.exists(root):
        raise DataError(f"data.root '{root}' does not exist")
    if not os.path.isdir(root) or not os.listdir(root):
        raise DataError(f"data.root '{root}' is empty or not a folder")
    if ds in ("cifar10", "cifar100"):
        src = cifar_source(root, train, 100 if ds == "cifar100" else 10)
    elif ds == "demo":
        src = demo_source(root, train)
    else:
        if os.path.isfile(os.path.join(root, "wnids.txt")) and os.path.isdir(os.path.join(root, "val", "images")):
            raise DataError(f"data.root '{root}' is the Tiny-ImageNet archive's layout: convert it with "
                            f"python datasets_prep/tiny_imagenet.py --src {root} --out data/tiny_imagenet")
        split = os.path.join(root, "train" if train else "val")
        if not os.path.isdir(split):
            raise DataError(f"{split}: missing split folder (expected {root}/train and {root}/val)")
        src = FolderSource(split, classes=train_classes, skip_bad=data_cfg.skip_bad_images,
                           mean_std=NORMALIZATION.get(ds, NORMALIZATION["imagenet"]), name=ds,
                           allow_empty=data_cfg.allow_empty_classes)
    if len(src.classes) != data_cfg.num_classes:
        raise DataError(f"{root}: dataset has {len(src.classes)} classes but data.num_classes="
                        f"{data_cfg.num_classes}")
    return src


def subset(src, n: int):
    """An evenly strided n-sample subset (class-balanced for sorted folders); it becomes the
    source's canonical order, so `index` counts positions within the subset."""
    out = copy.copy(src)
    keep = np.linspace(0, len(src) - 1, num=min(n, len(src))).round().astype(np.int64)
    out.labels = src.labels[keep]
    if hasattr(src, "images"):
        out.images = src.images[keep]
    if hasattr(src, "files"):
        out.files = [src.files[k] for k in keep]
    return out
