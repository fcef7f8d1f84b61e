"""`gpu`: the array route. The uint8 dataset lives on the training device; views are cut there.

For datasets of one image size that fit in device memory (CIFAR, Tiny-ImageNet, the demo). The training
split is uploaded once, already zero-padded by `data.crop_padding`; each epoch the rank's order and both
views' crop boxes (`pipelines.view_params`, one vectorised draw for the whole rank-epoch) go to the
device in one copy. A batch is then a bounded number of tensor calls whatever its size: one gather per
view, the strong view through the batched tensor augmenter (`pipelines.randaugment_segmented`: a call per
distinct op drawn), the normaliser. No worker processes, no per-sample Python in the training process.

This backend is the accelerator route whatever `pipeline.route` says: on a CPU it runs the same code
(views equal to the `torch` reference's), but there the host backends are the faster choice.

ImageFolder splits (Tiny-ImageNet) are decoded once with PIL into one uint8 array, cached as .npy
under `<data.root>/.crld_arrays/` (or `~/.cache/crld/` when the data folder is read-only), keyed by a
digest of the file list with sizes and modification times.
"""
from __future__ import annotations

import concurrent.futures
import copy
import fcntl
import hashlib
import json
import logging
import os

import numpy as np
import torch

from common.errors import UserError
from common.files import save_atomic, user_cache_dir
from pipelines.contract import Batch, ValBatch
from pipelines.device import Normalizer, helper_threads
from pipelines.randaugment_graph import strong_program
from pipelines.randaugment_segmented import StrongBatch
from pipelines.sampler import EpochSampler
from pipelines.sources import DataError
from pipelines.torch_backend import ValDataset
from pipelines.upsample import centre_anchor, resize_batch, resized_hw
from pipelines.view_params import draw_views

log = logging.getLogger(__name__)

# Bump when the cached arrays' content or layout changes.
_CACHE_VERSION = 1
# Images per host-to-device copy while uploading: bounds the temporary host and device copies.
_UPLOAD_CHUNK = 4096
# Images per decode task: one task per image would cost more in scheduling than a small decode.
_DECODE_CHUNK = 256


# ---- host arrays -----------------------------------------------------------------------------------

def _cache_dirs(root: str):
    return [os.path.join(root, ".crld_arrays"), user_cache_dir()]


def _digest(source, root: str, kind: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_VERSION, kind, bool(getattr(source, "skip_bad", False)),
                         source.classes]).encode())
    for path in source.files:
        st = os.stat(path)
        h.update(f"\0{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _load_cached(dirs, key):
    for d in dirs:
        img, lab = os.path.join(d, f"{key}.npy"), os.path.join(d, f"{key}.labels.npy")
        if os.path.isfile(img) and os.path.isfile(lab):
            try:
                return np.load(img, mmap_mode="r"), np.load(lab)
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable array cache %s (%s)", img, e)
    return None


def _store_cached(d, key, images, labels):
    try:
        # labels first: the images file's presence marks a complete entry
        save_atomic(os.path.join(d, f"{key}.labels.npy"), lambda f: np.save(f, labels))
        save_atomic(os.path.join(d, f"{key}.npy"), lambda f: np.save(f, images))
    except OSError as e:  # a full disk: train from the decoded array all the same
        log.warning("cannot write the array cache in %s (%s)", d, e)


def _decode_all(source, load, what: str):
    """Every sample through `load(i) -> (uint8 HWC array, label)` on a thread pool (PIL's decoders
    release the interpreter lock) into one array; all images must have the first one's shape."""
    first, label0 = load(0)
    shape = first.shape
    images = np.empty((len(source),) + shape, dtype=np.uint8)
    labels = np.empty(len(source), dtype=np.int64)
    images[0], labels[0] = first, label0

    def chunk(a, b):
        for i in range(a, b):
            arr, labels[i] = load(i)
            if arr.shape != shape:
                return i, arr.shape
            images[i] = arr
        return None

    starts = range(1, len(source), _DECODE_CHUNK)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)))
    try:
        futures = [pool.submit(chunk, a, min(a + _DECODE_CHUNK, len(source))) for a in starts]
        for fut in futures:  # in file order: the first differing file is the one reported
            bad = fut.result()
            if bad is not None:
                i, got = bad
                raise DataError(f"{source.files[i]}: {got[1]}x{got[0]} differs from {source.files[0]}'s "
                                f"{shape[1]}x{shape[0]}: the gpu pipeline needs one image size for {what}; "
                                f"use --pipeline dali or ffcv")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return images, labels


def _writable_dir(dirs):
    for d in dirs:
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            pass
    return None


def _folder_array(source, root: str, kind: str, load, what: str):
    dirs, key = _cache_dirs(root), _digest(source, root, kind)
    hit = _load_cached(dirs, key)
    if hit is not None:
        return hit
    d = _writable_dir(dirs)
    if d is None:
        log.warning("no writable array cache (%s): decoding %s in every run", " or ".join(dirs), what)
        return _decode_all(source, load, what)
    # One decoder per cache entry: DDP ranks (or concurrent runs) starting together wait for it instead of
    # each decoding the split with every core.
    with open(os.path.join(d, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = _load_cached(dirs, key)
        if hit is not None:
            return hit
        log.info("decoding %d images of %s into one array (once; cached in %s)", len(source), what, d)
        images, labels = _decode_all(source, load, what)
        _store_cached(d, key, images, labels)
        return images, labels


def train_array(source, cfg, kind: str = "train"):
    """(uint8 NHWC images, int64 labels) of a source at its native size."""
    if hasattr(source, "images"):
        return source.images, source.labels

    def load(i):
        img, label = source.load_sample(i)
        return np.asarray(img), label
    return _folder_array(source, cfg.data.root, kind, load, "training" if kind == "train" else "validation")


def val_array(source, cfg):
    """(uint8 NHWC images, int64 labels) of a validation source at `data.image_size`: the native pixels
    when they already have that size, else the reference backend's ValDataset transform, applied once."""
    size = cfg.data.image_size
    if cfg.data.resize_source:  # the native pixels: each batch is resized on the device (GpuValLoader)
        return train_array(source, cfg, "val:native")
    if hasattr(source, "images") and not cfg.data.val_resize and source.images.shape[1:3] == (size, size):
        return source.images, source.labels
    ds = ValDataset(source, cfg.data)

    def load(i):
        arr, label, _ = ds[(0, i)]
        return arr, label
    if hasattr(source, "images"):
        out = [load(i) for i in range(len(source))]  # once per run; array sources are small
        return np.stack([a for a, _ in out]), np.asarray([y for _, y in out], dtype=np.int64)
    return _folder_array(source, cfg.data.root, f"val:{size}:{cfg.data.val_resize}", load, "validation")


def _upload(images: np.ndarray, device, pad: int = 0) -> torch.Tensor:
    """(N, H + 2 pad, W + 2 pad, 3) uint8 on `device`, zeros around the images (RandomCrop's padding)."""
    n, h, w, c = images.shape
    out = torch.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=torch.uint8, device=device)
    for a in range(0, n, _UPLOAD_CHUNK):
        # a cached split arrives memory-mapped read-only: torch wants writable memory, so that part copies
        part = torch.from_numpy(np.require(images[a:a + _UPLOAD_CHUNK], np.uint8, ("C", "W")))
        out[a:a + len(part), pad:pad + h, pad:pad + w] = part.to(device)
    return out


# ---- loaders ---------------------------------------------------------------------------------------

class GpuTrainLoader:
    def __init__(self, source, cfg, device, rank: int, world: int, views: int):
        if cfg.data.train_crop != "pad":
            raise UserError(f"data.train_crop={cfg.data.train_crop}: the gpu pipeline serves padded crops "
                            f"(data.train_crop=pad) only; use --pipeline torch, dali or ffcv for resized crops")
        self.device, self.views = torch.device(device), views
        self.seed, self.batch, self.drop_last = cfg.run.seed, cfg.pipeline.batch_size // world, cfg.pipeline.drop_last
        self.size, self.pad = cfg.data.image_size, cfg.data.crop_padding
        self.resize = cfg.data.resize_source
        self.n_ops, self.strong_aug = cfg.pipeline.randaug_n, cfg.pipeline.strong_aug
        self.strong_program = strong_program(cfg.pipeline.strong_program)
        images, labels = train_array(source, cfg)
        # `data.resize_source`: the native pixels stay resident, each batch is resized on the device and
        # padded there; the views' boxes and offsets are those of the resized, padded images
        self.hw = tuple(resized_hw(images.shape[1:3], self.resize).tolist()) if self.resize else images.shape[1:3]
        self.data = _upload(images, self.device, 0 if self.resize else self.pad)
        self.flat = self.data.view(-1, 3)  # pixels in (image, row, column) order: one gather cuts a view
        self.padded_hw = (self.hw[0] + 2 * self.pad, self.hw[1] + 2 * self.pad)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.sampler = EpochSampler(len(labels), seed=self.seed, shuffle=True, rank=rank, world=world)
        self.start = 0  # the first batch of the next iteration (set_epoch)
        self.normalize = Normalizer.for_run(source.mean_std, cfg, device)
        s = torch.arange(self.size, device=self.device)
        row_stride = self.padded_hw[1]
        self._rows = (s * row_stride).view(1, -1, 1)                # (1, S, 1) row offsets
        self._cols = s.view(1, 1, -1)                               # (1, 1, S) columns, left to right
        self._cols_flipped = (self.size - 1 - s).view(1, 1, -1)     # and mirrored
        self._planner, self._ahead = helper_threads(1, self.device, "gpu-epoch-plan"), None

    def set_epoch(self, epoch: int, start: int = 0):
        self.sampler.set_epoch(epoch)
        self.start = start

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch if self.drop_last else -(-n // self.batch)

    def _plan(self, epoch: int):
        """Host work of a rank-epoch: its order and, per sample and view, the flat position of the crop's
        top-left pixel and the flip, as one (pinned on CUDA) tensor; the strong draws stay on the host."""
        sampler = copy.copy(self.sampler)
        sampler.set_epoch(epoch)
        order = torch.as_tensor(sampler.indices(), dtype=torch.int64)
        vb = draw_views(self.seed, epoch, order.numpy(), self.hw, crop="pad", size=self.size,
                        pad=self.pad, n_ops=self.n_ops, strong_aug=self.strong_aug and self.views == 2)
        boxes = torch.from_numpy(vb.boxes).long()                   # (n, 2, 5): top, left, h, w, flip
        hp, wp = self.padded_hw
        start = (boxes[..., 0] + self.pad) * wp + boxes[..., 1] + self.pad
        if not self.resize:  # offsets into the resident array; else into the batch's resized copy (`_batch`)
            start += order[:, None] * hp * wp
        host = torch.cat([order[:, None], start, boxes[..., 4]], 1)  # (n, 5): one copy per epoch
        return order, (host.pin_memory() if self.device.type == "cuda" else host), vb.strong

    def _epoch(self):
        """The epoch's plan (made ahead while the previous epoch ran, else now) on the device, and the next
        epoch's plan started on a helper thread, so that an epoch boundary waits for no drawing."""
        epoch = self.sampler.epoch
        ahead, self._ahead = self._ahead, None
        order, host, strong = ahead[1].result() if ahead and ahead[0] == epoch else self._plan(epoch)
        self._ahead = (epoch + 1, self._planner.submit(self._plan, epoch + 1))
        dev = host.to(self.device, non_blocking=True)
        index = dev[:, 0]
        return order, index, self.labels[index], dev[:, 1:3], dev[:, 3:5].bool(), strong

    def _cut(self, flat: torch.Tensor, start: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        cols = torch.where(flip.view(-1, 1, 1), self._cols_flipped, self._cols)
        return flat[start.view(-1, 1, 1) + self._rows + cols]  # (B, S, S, 3) uint8

    def _batch(self, index: torch.Tensor, start: torch.Tensor):
        """The pixels a batch's views are cut from and the views' offsets into them."""
        if not self.resize:
            return self.flat, start
        x = resize_batch(self.data[index], self.hw)
        p = self.pad
        x = torch.nn.functional.pad(x, (0, 0, p, p, p, p)) if p else x
        base = torch.arange(len(index), device=self.device).view(-1, 1) * (self.padded_hw[0] * self.padded_hw[1])
        return x.reshape(-1, 3), start + base

    def __iter__(self):
        order, index, target, start, flip, strong = self._epoch()
        for b in range(self.start, len(self)):
            sl = slice(b * self.batch, (b + 1) * self.batch)
            flat, at = self._batch(index[sl], start[sl])
            weak = self.normalize(self._cut(flat, at[:, 0], flip[sl, 0]))
            if self.views == 1:
                yield Batch(weak, None, target[sl], index[sl], order[sl])
                continue
            x = self._cut(flat, at[:, 1], flip[sl, 1])
            if strong is not None:
                x = self.strong_program(x, StrongBatch.from_draws(strong.take(sl)), channels_last_input=True)
            yield Batch(weak, self.normalize(x), target[sl], index[sl], order[sl])


class GpuValLoader:
    def __init__(self, source, cfg, device, rank: int, world: int):
        self.device, self.batch = torch.device(device), cfg.pipeline.val_batch_size
        images, labels = val_array(source, cfg)
        # Each sample counted once under DDP: this rank keeps its unpadded share.
        keep = EpochSampler(len(labels), seed=0, shuffle=False, rank=rank, world=world, pad=False).indices()
        keep = np.asarray(keep, dtype=np.int64)
        self.data = _upload(images[keep] if world > 1 else images, self.device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)[keep]).to(self.device)
        self.index = torch.from_numpy(keep).to(self.device)
        self.normalize = Normalizer.for_run(source.mean_std, cfg, device)
        self.size, self.resize = cfg.data.image_size, cfg.data.resize_source
        if self.resize:
            self.hw = tuple(resized_hw(images.shape[1:3], self.resize).tolist())
            self.anchor = centre_anchor(self.hw, self.size).tolist()

    def set_epoch(self, epoch: int, start: int = 0):
        pass  # no augmentation, one fixed order

    def __len__(self):
        return -(-len(self.labels) // self.batch)

    def __iter__(self):
        for b in range(len(self)):
            sl = slice(b * self.batch, (b + 1) * self.batch)
            yield ValBatch(self.normalize(self._images(sl)), self.labels[sl], self.index[sl])

    def _images(self, sl):
        if not self.resize:
            return self.data[sl]
        (top, left), s = self.anchor, self.size
        return resize_batch(self.data[sl], self.hw)[:, top:top + s, left:left + s]


def build_train(source, cfg, device, rank: int = 0, world: int = 1, views: int = 2, *, device_route: bool):
    # always the device route: the data is resident on the training device
    return GpuTrainLoader(source, cfg, device, rank, world, views)


def build_val(source, cfg, device, rank: int = 0, world: int = 1, *, device_route: bool):
    return GpuValLoader(source, cfg, device, rank, world)
