"""Replayable view parameters: every random choice of a view is a pure function of
(seed, epoch, sample index, view), drawn from a counter-based Philox4x32-10 generator.

There is no generator state: uniform number k of a view is Philox(key=seed, counter=(view, index,
epoch, block(k))), so any backend, worker count or process layout that is handed the same
(seed, epoch, index, view) makes the same view. The generator is evaluated with numpy over a whole
batch (or epoch) of indices at once: a batch costs a fixed number of numpy calls, whatever its size.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import numpy as np

from pipelines.augment_spec import CUTOUT_MAX_FRAC, N_OPS, STRONG_OPS

WEAK, STRONG = 0, 1
# Bump when the mapping (seed, epoch, index, view) -> view changes: teacher caches fingerprint it.
VIEWS_VERSION = 4

_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_W = (0x9E3779B9, 0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)
_STRONG_BLOCK = 16  # the strong parameters' counter blocks start here, after any crop's uniforms
_OP_LOW = np.array([s.low for s in STRONG_OPS])
_OP_SPAN = np.array([s.high - s.low for s in STRONG_OPS])


def philox(seed: int, counters: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of (..., 4) uint64 counters holding 32-bit words under the 64-bit key `seed`;
    returns (..., 4) uint64 words (Salmon et al., SC'11: Random123's philox4x32_10)."""
    seed &= 2**64 - 1
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    c0, c1, c2, c3 = (counters[..., i].astype(np.uint64) for i in range(4))
    for _ in range(10):
        p0, p1 = _M[0] * c0, _M[1] * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _LOW32, \
            (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _LOW32
        k0, k1 = (k0 + _W[0]) & 0xFFFFFFFF, (k1 + _W[1]) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], -1)


def uniforms(seed: int, epoch: int, index: np.ndarray, view: int, n: int, first_block: int = 0) -> np.ndarray:
    """(N, n) float64 uniforms in [0, 1) of each sample's view: two per Philox block, 53 bits each
    (numpy's double construction from two 32-bit words)."""
    index = np.asarray(index, dtype=np.uint64).reshape(-1)
    blocks = np.arange(first_block, first_block + (n + 1) // 2, dtype=np.uint64)
    ctr = np.empty((len(index), len(blocks), 4), dtype=np.uint64)
    ctr[..., 0], ctr[..., 1], ctr[..., 2], ctr[..., 3] = view, index[:, None], epoch, blocks
    w = philox(seed, ctr).reshape(len(index), -1, 2)
    u = ((w[..., 0] >> np.uint64(5)) * np.uint64(67108864) + (w[..., 1] >> np.uint64(6))) * (1.0 / 9007199254740992.0)
    return u[:, :n]


def _index(u: np.ndarray, n: np.ndarray) -> np.ndarray:
    """floor(u * n) in [0, n): a uniform choice among n positions (biased by at most n / 2^53)."""
    n = np.asarray(n, dtype=np.int64)
    if np.any(n < 1):
        raise ValueError(f"no valid position: the image is smaller than the crop allows "
                         f"({int(np.min(n))} choices)")
    return np.minimum((u * n).astype(np.int64), n - 1)


def pad_crops(u: np.ndarray, hw: np.ndarray, size: int, pad: int) -> np.ndarray:
    """RandomCrop(size, padding=pad) + flip from 3 uniforms per sample: (N, 5) top, left, h, w, flip.
    The box may reach `pad` pixels outside the image."""
    out = np.empty((len(u), 5), dtype=np.int64)
    out[:, 0] = _index(u[:, 0], hw[:, 0] + 2 * pad - size + 1) - pad
    out[:, 1] = _index(u[:, 1], hw[:, 1] + 2 * pad - size + 1) - pad
    out[:, 2:4] = size
    out[:, 4] = u[:, 2] < 0.5
    return out


_RRC_TRIES = 10
RRC_UNIFORMS = 2 * _RRC_TRIES + 3  # (area, aspect) per try, then top, left, flip


def resized_crops(u: np.ndarray, hw: np.ndarray, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop box algorithm (10 tries, the first that fits, else a clamped
    centre crop) + flip, for all samples at once: (N, 5) top, left, h, w, flip."""
    img_h, img_w = hw[:, 0:1].astype(np.float64), hw[:, 1:2].astype(np.float64)
    target = img_h * img_w * (scale[0] + (scale[1] - scale[0]) * u[:, 0:2 * _RRC_TRIES:2])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, 1:2 * _RRC_TRIES:2])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint: half to even, as Python's round
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= img_w) & (h > 0) & (h <= img_h)
    first = fits.argmax(1)
    rows = np.arange(len(u))
    bh, bw = h[rows, first], w[rows, first]
    # fallback: the whole image clamped to the ratio range, centred
    ih, iw = hw[:, 0].astype(np.int64), hw[:, 1].astype(np.int64)
    in_ratio = iw / ih
    fh = np.where(in_ratio < ratio[0], np.rint(iw / ratio[0]).astype(np.int64), ih)
    fw = np.where(in_ratio > ratio[1], np.rint(ih * ratio[1]).astype(np.int64), iw)
    ok = fits.any(1)
    bh, bw = np.where(ok, bh, fh), np.where(ok, bw, fw)
    top = np.where(ok, _index(u[:, -3], np.where(ok, ih - bh + 1, 1)), (ih - bh) // 2)
    left = np.where(ok, _index(u[:, -2], np.where(ok, iw - bw + 1, 1)), (iw - bw) // 2)
    return np.stack([top, left, bh, bw, u[:, -1] < 0.5], 1).astype(np.int64)


class Crop(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    flip: bool


class StrongParams(NamedTuple):
    ops: Tuple[Tuple[int, float], ...]   # (index into STRONG_OPS, magnitude)
    cutout_frac: float                   # side / image width, in [0, CUTOUT_MAX_FRAC)
    cutout_cx: float                     # centre, as a fraction of width / height, in [0, 1)
    cutout_cy: float


class StrongDraws(NamedTuple):
    """The strong augmentation of N samples: ops (N, K) int64 ids into STRONG_OPS, mags (N, K) float64,
    cutout (N, 3) float64 = (side fraction, centre x, centre y)."""
    ops: np.ndarray
    mags: np.ndarray
    cutout: np.ndarray

    def params(self, j: int) -> StrongParams:
        """Sample j's parameters, for per-sample consumers (the PIL definition)."""
        ops = tuple((int(o), float(m)) for o, m in zip(self.ops[j], self.mags[j]))
        return StrongParams(ops, *(float(v) for v in self.cutout[j]))

    def take(self, rows) -> "StrongDraws":
        return StrongDraws(self.ops[rows], self.mags[rows], self.cutout[rows])


def strong_draws(seed: int, epoch: int, index, n_ops: int = N_OPS) -> StrongDraws:
    """n_ops ops drawn uniformly with replacement, a magnitude for each from its range, and a Cutout box."""
    u = uniforms(seed, epoch, index, STRONG, 2 * n_ops + 3, _STRONG_BLOCK)
    ops = _index(u[:, :n_ops], len(STRONG_OPS))
    mags = _OP_LOW[ops] + _OP_SPAN[ops] * u[:, n_ops:2 * n_ops]
    cut = np.stack([u[:, 2 * n_ops] * CUTOUT_MAX_FRAC, u[:, 2 * n_ops + 1], u[:, 2 * n_ops + 2]], 1)
    return StrongDraws(ops, mags, cut)


def run_strong_draws(cfg, epoch: int, index, views: int) -> Optional[StrongDraws]:
    """The strong augmentation a run gives these samples: None for single-view methods (`views` 1) or with
    `pipeline.strong_aug` off. For backends that draw it apart from the boxes (from the indices a batch
    comes back with)."""
    pc = cfg.pipeline
    return strong_draws(cfg.run.seed, epoch, index, pc.randaug_n) if views == 2 and pc.strong_aug else None


class ViewBatch(NamedTuple):
    """Both views of N samples. boxes: (N, 2, 5) int32 = (top, left, height, width, flip) of the weak
    (0) and strong (1) crop; strong: the strong augmentation, or None when it is off."""
    boxes: np.ndarray
    strong: Optional[StrongDraws]

    def crop(self, j: int, view: int) -> Crop:
        t, l, h, w, f = self.boxes[j, view].tolist()
        return Crop(t, l, h, w, bool(f))


def crops(seed: int, epoch: int, index, hw, view: int, *, crop: str, size: int, pad: int) -> np.ndarray:
    """(N, 5) boxes of one view; hw: (N, 2) or (2,) image height and width."""
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    hw = np.broadcast_to(np.asarray(hw, dtype=np.int64).reshape(-1, 2), (len(index), 2))
    if crop == "pad":
        return pad_crops(uniforms(seed, epoch, index, view, 3), hw, size, pad)
    return resized_crops(uniforms(seed, epoch, index, view, RRC_UNIFORMS), hw)


def draw_views(seed: int, epoch: int, index, hw, *, crop: str, size: int, pad: int, n_ops: int = N_OPS,
               strong_aug: bool = True) -> ViewBatch:
    """Both views of every sample in `index` (any length: a batch, or a rank's epoch)."""
    boxes = np.stack([crops(seed, epoch, index, hw, v, crop=crop, size=size, pad=pad) for v in (WEAK, STRONG)], 1)
    return ViewBatch(boxes.astype(np.int32), strong_draws(seed, epoch, index, n_ops) if strong_aug else None)
