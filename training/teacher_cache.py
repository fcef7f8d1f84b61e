"""Teacher-logit cache: the frozen teacher's logits on exactly the views a student will see.

Views are a pure function of (seed, epoch, index, view) (`pipelines.view_params`), so the cache
holds, for each augmentation epoch, both views' logits of every training sample. Layout of a
cache directory (built by `cache_teacher.py`, read by the trainer with `teacher.source=cache`):

    meta.json              fingerprint, epochs, shapes, build figures (written last, atomically)
    epoch_0000/order.npy   int32 (N,): row p holds sample order[p] (the epoch's training order)
    epoch_0000/logits.npy  (N, 2, C) float16 / bfloat16 (as uint16 bits) / float32      full cache
    epoch_0000/values.npy, classes.npy, fill.npy   (N, 2, k), (N, 2, k), (N, 2)           top-k cache
    epoch_0000/checksums.json   bytes and CRC-32 of each file (`training.cache_units`; docs/cache_format.md)

Rows are stored in the epoch's training order (`pipelines.sampler.epoch_order`), so a student
reads each epoch front to back; an epoch directory appears only complete (temp dir + rename).

Top-k keeps the k largest logits of each view and one fill value for the other C - k classes,
chosen so that the softmax at the training temperature T has the exact top-k probabilities and
the exact total tail mass. The CRLD confidence gates (softmax at T=1) and DKD's target/non-target
split then carry a small, measured error (docs/benchmarks.md, tests/test_teacher_cache.py).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from common.errors import UserError
from common.files import fsync_path, save_json_atomic
from common.precision import amp_dtype
from pipelines.device import helper_threads, on_device
from pipelines.splits import beton_paths
from pipelines.augment_spec import CUTOUT_FILL, CUTOUT_MAX_FRAC, N_OPS, SPEC_VERSION, STRONG_OPS
from pipelines.sampler import epoch_order
from pipelines.view_params import VIEWS_VERSION

FORMAT = 1
PRECISIONS = ("fp16", "bf16", "fp32")
_NP_DTYPE = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}  # bf16 kept as raw bits


class CacheError(UserError):
    """A teacher cache that is missing, stale, incomplete or does not match the run's config."""


# ---- identity ------------------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_digest(source) -> str:
    """Labels plus pixels (array datasets) or relative file names and byte sizes (folders): a cache built on
    other data of the same size cannot be paired with this one, nor one built on a re-encoded or resized copy
    of the same tree (other image sizes mean other crop boxes). Hashing every image would read the dataset.
    A .beton split (`pipelines.splits.BetonSource`) carries this digest of its source, taken at conversion."""
    if getattr(source, "digest", None):
        return source.digest
    h = hashlib.sha256(np.ascontiguousarray(source.labels).tobytes())
    if hasattr(source, "images"):
        h.update(np.ascontiguousarray(source.images).tobytes())
    if hasattr(source, "files"):
        root = os.path.commonpath(source.files) if len(source.files) > 1 else ""
        h.update("\n".join(os.path.relpath(f, root) if root else f for f in source.files).encode())
        with ThreadPoolExecutor(16) as pool:  # stat is I/O-bound: threads hide a network file system's latency
            sizes = list(pool.map(lambda f: os.stat(f).st_size, source.files, chunksize=1024))
        h.update(np.asarray(sizes, dtype=np.int64).tobytes())
    return h.hexdigest()


def augmentation_digest() -> str:
    spec = repr((SPEC_VERSION, VIEWS_VERSION, STRONG_OPS, N_OPS, CUTOUT_MAX_FRAC, CUTOUT_FILL))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def view_source(cfg, device="cpu") -> str:
    """What the views are cut from, and how, where that changes their pixels. `torch` and `dali` (either
    route) and `gpu` cut the same decoded images (pixels within the documented tolerance); `ffcv` reads a
    .beton whose images may have been resized (--max-resolution) or re-encoded, so its views are its own,
    and on the accelerator route its resized crops come from FFCV's compiled resize, not torch's. Sources
    resized before the crop (`data.resize_source`) are named with that size: other pixels, other views."""
    resized = f":resized-{cfg.data.resize_source}-bicubic" if cfg.data.resize_source else ""
    return _decoded_from(cfg, device) + resized


def _decoded_from(cfg, device) -> str:
    if cfg.pipeline.name != "ffcv":
        return "source images"
    side = beton_paths(cfg)[0] + ".json"
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(f"{side}: cannot read the .beton sidecar ({e})") from None
    keep = {k: meta.get(k) for k in ("settings", "num_samples", "beton_bytes")}
    compiled = cfg.data.train_crop == "rrc" and on_device(cfg, device) and not cfg.data.resize_source
    resize = ":compiled-resize" if compiled else ""
    return "ffcv:" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16] + resize


def fingerprint(cfg, source, *, precision: str, topk: int, teacher_sha: Optional[str], device) -> dict:
    """Everything that decides the cached numbers. `teacher_sha256` is None when the caller has no
    checkpoint to hash (a student run given only the cache): then that field is not compared."""
    d, p = cfg.data, cfg.pipeline
    amp = amp_dtype(cfg.run.amp, device)
    return {"format": FORMAT, "teacher": cfg.teacher.name, "teacher_sha256": teacher_sha,
            # the teacher's compute precision: bf16 logits stored as fp32 are still bf16 logits
            "teacher_amp": str(amp).replace("torch.", "") if amp else "off",
            "dataset": d.dataset, "num_samples": len(source), "data_sha256": dataset_digest(source),
            "num_classes": d.num_classes, "seed": cfg.run.seed, "augmentation": augmentation_digest(),
            "view_source": view_source(cfg, device), "image_size": d.image_size, "train_crop": d.train_crop,
            "crop_padding": d.crop_padding if d.train_crop == "pad" else 0,
            "randaug_n": p.randaug_n, "strong_aug": p.strong_aug, "precision": precision, "topk": topk,
            # top-k fill values depend on the temperature (and on standardisation, refused below)
            "temperature": float(cfg.method.temperature) if topk else None}


def compare_fingerprints(path: str, cached: dict, wanted: dict) -> None:
    if not isinstance(cached, dict):
        raise CacheError(f"{path}: meta.json has no fingerprint; rebuild the cache with cache_teacher.py")
    for key, want in wanted.items():
        if key == "teacher_sha256" and want is None:
            continue
        have = cached.get(key)
        if have != want:
            def show(v):
                return f"{v[:12]}..." if isinstance(v, str) and len(v) > 24 else repr(v)
            raise CacheError(f"{path}: teacher cache does not match this run: '{key}' is {show(have)} in the "
                             f"cache but {show(want)} here (rebuild it with cache_teacher.py)")


# ---- top-k ---------------------------------------------------------------------------------------
def compress_topk(logits: torch.Tensor, k: int, temperature: float):
    """(..., C) float logits -> top-k values, their classes, and the tail fill value."""
    c = logits.shape[-1]
    top = logits.float().topk(k, -1)
    rest = logits.float().scatter(-1, top.indices, float("-inf"))
    # (C - k) * exp(fill / T) == sum over the tail of exp(z / T)
    fill = temperature * (torch.logsumexp(rest / temperature, -1) - math.log(c - k))
    return top.values, top.indices, fill


def rebuild_topk(values: torch.Tensor, classes: torch.Tensor, fill: torch.Tensor, num_classes: int):
    out = fill.float()[..., None].expand(*fill.shape, num_classes).clone()
    return out.scatter_(-1, classes.long(), values.float())


def to_storage(x: torch.Tensor, precision: str) -> np.ndarray:
    if precision == "bf16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(torch.float16 if precision == "fp16" else torch.float32).numpy()


def from_storage(a: np.ndarray, precision: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if precision == "bf16" else t


def array_specs(n: int, c: int, precision: str, topk: int) -> dict:
    """name -> (numpy dtype, shape) of one epoch's arrays."""
    specs = {"order": (np.int32, (n,))}
    if topk:
        specs.update(values=(_NP_DTYPE[precision], (n, 2, topk)),
                     classes=(np.int16 if c <= 32767 else np.int32, (n, 2, topk)), fill=(np.float32, (n, 2)))
    else:
        specs["logits"] = (_NP_DTYPE[precision], (n, 2, c))
    return specs


def epoch_bytes(n: int, c: int, precision: str, topk: int) -> int:
    return sum(np.dtype(dt).itemsize * math.prod(shape) for dt, shape in array_specs(n, c, precision, topk).values())


def epoch_dir(root: str, epoch: int) -> str:
    return os.path.join(root, f"epoch_{epoch:04d}")


def read_meta(root: str) -> Optional[dict]:
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable cache metadata ({e})") from None


def write_meta(root: str, meta: dict, name: str = "meta.json") -> None:
    # the temporary name is one `training.cache_units` clears after a killed build
    save_json_atomic(os.path.join(root, name), meta, prefix=f".{name.lstrip('.')}.tmp", fsync=True)


# ---- writing -------------------------------------------------------------------------------------
class RowWriter:
    """Rows [lo, hi) of one epoch's arrays (positions in the epoch's training order), written into a temp
    directory and renamed to `final` on `commit`: a reader sees the rows complete or not at all."""

    def __init__(self, final: str, epoch: int, n: int, c: int, precision: str, topk: int, temperature: float,
                 seed: int, rows: Optional[tuple] = None):
        self.final = final
        self.tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp{os.getpid()}")
        self.precision, self.topk, self.temperature = precision, topk, temperature
        self.lo, self.hi = rows or (0, n)
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.arrays = {}
        whole = (self.lo, self.hi) == (0, n)
        for name, (dt, shape) in array_specs(n, c, precision, topk).items():
            if name == "order" and not whole:
                continue  # a block's rows are placed by the epoch's order, which the assembly writes once
            path = os.path.join(self.tmp, f"{name}.npy")
            a = np.lib.format.open_memmap(path, mode="w+", dtype=dt, shape=(self.hi - self.lo, *shape[1:]))
            # Reserve the blocks now: a full disk is an OSError here, not a SIGBUS in a later page write.
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
            self.arrays[name] = a
        order = epoch_order(n, seed, epoch).numpy()
        if whole:
            self.arrays["order"][:] = order
        self.pos = np.empty(n, dtype=np.int64)
        self.pos[order] = np.arange(n) - self.lo
        self.written = np.zeros(self.hi - self.lo, dtype=bool)

    def write(self, index: np.ndarray, logits: torch.Tensor) -> None:
        """index: (B,) sample indices; logits: (B, 2, C) float, weak view first."""
        pos = self.pos[index]
        if pos.min() < 0 or pos.max() >= len(self.written):
            raise CacheError(f"{self.final}: the loader yielded samples outside rows {self.lo}-{self.hi} of the "
                             f"epoch's order (a backend with its own order must build whole epochs)")
        order = np.argsort(pos)  # ascending rows: sequential writes
        pos, logits = pos[order], logits[torch.from_numpy(order)]
        if self.topk:
            v, k, f = compress_topk(logits, self.topk, self.temperature)
            self.arrays["values"][pos] = to_storage(v, self.precision)
            self.arrays["classes"][pos] = k.numpy().astype(self.arrays["classes"].dtype)
            self.arrays["fill"][pos] = f.numpy()
        else:
            self.arrays["logits"][pos] = to_storage(logits, self.precision)
        self.written[pos] = True

    def commit(self) -> None:
        if not self.written.all():
            missing = np.flatnonzero(~self.written)
            raise CacheError(f"{self.final}: the loader skipped {len(missing)} samples (first: order position "
                             f"{self.lo + missing[0]}); the cache must cover every sample once (pipeline.drop_last)")
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()
        for name in os.listdir(self.tmp):  # on disk before the rename makes the rows visible
            fsync_path(os.path.join(self.tmp, name))
        shutil.rmtree(self.final, ignore_errors=True)  # rows left behind by a build killed before its record
        os.rename(self.tmp, self.final)
        fsync_path(os.path.dirname(self.final))

    def abort(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


class EpochWriter(RowWriter):
    """A whole epoch written straight into `epoch_NNNN/` (no checksums: `training.cache_units` builds those)."""

    def __init__(self, root: str, epoch: int, n: int, c: int, precision: str, topk: int, temperature: float,
                 seed: int):
        super().__init__(epoch_dir(root, epoch), epoch, n, c, precision, topk, temperature, seed)


def check_epoch_files(root: str, epoch: int, n: int, c: int, precision: str, topk: int) -> dict:
    """The one rule every reader applies to an epoch before using it: each file's .npy header holds the
    expected dtype and shape and the file has exactly the bytes that header promises. name -> path."""
    paths = {}
    for name, (dt, shape) in array_specs(n, c, precision, topk).items():
        path = os.path.join(epoch_dir(root, epoch), f"{name}.npy")
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                have_shape, fortran, have_dt = read(f)
                offset = f.tell()
            size = os.path.getsize(path)
        except (OSError, ValueError, SyntaxError) as e:
            raise CacheError(f"{path}: missing, truncated or corrupt cache file ({e})") from None
        if have_dt != np.dtype(dt) or tuple(have_shape) != shape or fortran:
            raise CacheError(f"{path}: holds {have_dt}{list(have_shape)}, expected {np.dtype(dt)}{list(shape)}")
        want = offset + np.dtype(dt).itemsize * math.prod(shape)
        if size != want:
            raise CacheError(f"{path}: missing, truncated or corrupt cache file ({size} bytes, its header "
                             f"promises {want})")
        paths[name] = path
    return paths


# ---- reading -------------------------------------------------------------------------------------
class TeacherCache:
    """Rows of a checked cache for (epoch, indices), on the device, read on a background thread."""

    def __init__(self, root: str, wanted: dict, epochs_needed: int, cycle: bool, device: torch.device):
        meta = read_meta(root)
        if meta is None:
            what = "does not exist" if not os.path.exists(root) else "has no meta.json (never completed)"
            raise CacheError(f"{root}: teacher cache {what}; build it with cache_teacher.py")
        compare_fingerprints(root, meta.get("fingerprint"), wanted)
        self.root, self.meta, self.device = root, meta, device
        fp = meta["fingerprint"]
        self.n, self.c, self.precision, self.topk = fp["num_samples"], fp["num_classes"], fp["precision"], fp["topk"]
        self.epochs = int(meta["epochs"])
        if epochs_needed > self.epochs and not cycle:
            raise CacheError(f"{root}: the cache holds {self.epochs} augmentation epochs but the run needs "
                             f"{epochs_needed}; extend it (cache_teacher.py --epochs {epochs_needed}) or set "
                             f"teacher.cache_cycle=true to replay its epochs (views included) in turn")
        self.cycle = cycle
        self._epochs = {}
        self._pool = helper_threads(1, device, "teacher_cache")
        for e in range(self.epochs):  # fail before training starts, not at epoch 200
            self._open_epoch(e, check_only=True)

    def view_epoch(self, epoch: int) -> int:
        """The augmentation epoch whose views (and cached logits) training epoch `epoch` uses."""
        return epoch % self.epochs if self.cycle else epoch

    def _open_epoch(self, e: int, check_only: bool = False):
        if e in self._epochs:
            return self._epochs[e]
        paths = check_epoch_files(self.root, e, self.n, self.c, self.precision, self.topk)
        if check_only:
            return None
        arrays = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
        for old in [k for k in self._epochs if abs(k - e) > 1]:  # keep this epoch and its neighbours only
            del self._epochs[old]
        pos = np.empty(self.n, dtype=np.int64)
        pos[np.asarray(arrays.pop("order"))] = np.arange(self.n)
        self._epochs[e] = (pos, arrays)
        return self._epochs[e]

    def _read(self, epoch: int, index: torch.Tensor):
        pos_of, arrays = self._open_epoch(epoch)
        idx = index.cpu().numpy()  # the loaders hand host indices (Batch.index_host): no device sync
        pos = pos_of[idx]
        order = np.argsort(pos, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        rows = {k: a[pos[order]][inv] for k, a in arrays.items()}  # sorted reads, batch order restored
        pin = self.device.type == "cuda"
        out = {}
        for k, a in rows.items():
            t = from_storage(a, self.precision) if k in ("logits", "values") else torch.from_numpy(a)
            out[k] = t.pin_memory() if pin else t
        return out

    def submit(self, epoch: int, index: torch.Tensor) -> Future:
        return self._pool.submit(self._read, epoch, index)

    def result(self, fut: Future):
        """(teacher_weak, teacher_strong) float32 logits, each (B, C). The host-to-device copy is issued
        here, on the training thread's current stream, so it is ordered before the kernels that use it."""
        rows = {k: v.to(self.device, non_blocking=True) for k, v in fut.result().items()}
        t = rows["logits"].float() if not self.topk else rebuild_topk(rows["values"], rows["classes"],
                                                                      rows["fill"], self.c)
        return t[:, 0], t[:, 1]

    def alongside(self, batches, epoch: int):
        """Each batch of `batches` (augmentation epoch `epoch`) with its (teacher_weak, teacher_strong) logits.
        The next batch's rows are read on the cache's thread while the caller trains on this one."""
        pending = None
        for b in batches:
            ahead = b, self.submit(epoch, b.index if b.index_host is None else b.index_host)
            if pending is not None:
                yield pending[0], self.result(pending[1])
            pending = ahead
        if pending is not None:
            yield pending[0], self.result(pending[1])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._epochs.clear()

    def logits(self, epoch: int, index: torch.Tensor):
        return self.result(self.submit(epoch, index))
