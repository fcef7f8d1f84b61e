"""Replayable view parameters: every random choice of a view is a pure function of
(seed, epoch, sample index, view), drawn from a counter-based Philox generator.

No hidden global RNG state is involved, so any backend, worker count or process layout that is
handed the same (seed, epoch, index, view) makes the same view.
"""
from __future__ import annotations

import math
import threading
from typing import List, NamedTuple, Tuple

import numpy as np

from pipelines.augment_spec import CUTOUT_MAX_FRAC, N_OPS, STRONG_OPS

WEAK, STRONG = 0, 1
# Bump when the mapping (seed, epoch, index, view) -> view changes: teacher caches fingerprint it.
VIEWS_VERSION = 3  # 2: crop-then-resize (torchvision), not PIL resize(box=); 3: block draws


_LOCAL = threading.local()


def view_rng(seed: int, epoch: int, index: int, view: int) -> np.random.Generator:
    """The generator of one view: Philox keyed by the seed, counter (view, index, epoch, 0).

    Returns this thread's generator with its state set, the same stream as a freshly built
    `Generator(Philox(key=seed, counter=[view, index, epoch, 0]))` (tests) at a fifth of the cost;
    valid until the thread's next call."""
    gen = getattr(_LOCAL, "gen", None)
    if gen is None:
        gen = _LOCAL.gen = np.random.Generator(np.random.Philox(key=0))
        _LOCAL.state = gen.bit_generator.state
    state = _LOCAL.state
    state["state"]["counter"] = np.array([view, index, epoch, 0], dtype=np.uint64)
    state["state"]["key"] = np.array([seed & (2**64 - 1), 0], dtype=np.uint64)
    state["buffer_pos"], state["has_uint32"], state["uinteger"] = 4, 0, 0  # nothing buffered
    gen.bit_generator.state = state
    return gen


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


# Each function draws its uniforms in one block (`rng.random(k)`) and maps them with floor(u * n): one
# generator call instead of up to 25 (~1 us each, the bulk of a view's host cost). floor(u * n) is biased
# by at most n / 2^53.
def _index(u: float, n: int) -> int:
    if n < 1:
        raise ValueError(f"no valid position: the image is smaller than the crop allows ({n} choices)")
    return min(int(u * n), n - 1)


def pad_crop(rng, img_h: int, img_w: int, size: int, pad: int) -> Crop:
    """RandomCrop(size, padding=pad) + flip: the box may reach `pad` pixels outside the image."""
    u = rng.random(3).tolist()
    top = _index(u[0], img_h + 2 * pad - size + 1) - pad
    left = _index(u[1], img_w + 2 * pad - size + 1) - pad
    return Crop(top, left, size, size, u[2] < 0.5)


_RRC_TRIES = 10


def random_resized_crop(rng, img_h: int, img_w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Crop:
    """torchvision's RandomResizedCrop box algorithm (10 tries, then a clamped centre crop) + flip."""
    u = rng.random(2 * _RRC_TRIES + 3).tolist()  # (area, aspect) per try, then top, left, flip
    area = img_h * img_w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for t in range(_RRC_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[2 * t + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= img_w and 0 < h <= img_h:
            box = (_index(u[-3], img_h - h + 1), _index(u[-2], img_w - w + 1), h, w)
            break
    if box is None:
        in_ratio = img_w / img_h
        if in_ratio < ratio[0]:
            w, h = img_w, int(round(img_w / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = img_h, int(round(img_h * ratio[1]))
        else:
            w, h = img_w, img_h
        box = ((img_h - h) // 2, (img_w - w) // 2, h, w)
    return Crop(*box, u[-1] < 0.5)


def strong_params(rng, n_ops: int = N_OPS) -> StrongParams:
    """n_ops ops drawn uniformly with replacement, a magnitude for each from its range, and a Cutout box."""
    u = rng.random(2 * n_ops + 3).tolist()
    ops: List[Tuple[int, float]] = []
    for k in range(n_ops):
        i = _index(u[k], len(STRONG_OPS))
        spec = STRONG_OPS[i]
        ops.append((i, spec.low + (spec.high - spec.low) * u[n_ops + k]))
    return StrongParams(tuple(ops), u[2 * n_ops] * CUTOUT_MAX_FRAC, u[2 * n_ops + 1], u[2 * n_ops + 2])


def sample_views(seed: int, epoch: int, index: int, img_h: int, img_w: int, *, crop: str, size: int,
                 pad: int, n_ops: int = N_OPS, strong_aug: bool = True):
    """(weak Crop, strong Crop, StrongParams or None) for one sample in one epoch."""
    views = []
    for v in (WEAK, STRONG):
        rng = view_rng(seed, epoch, index, v)
        c = pad_crop(rng, img_h, img_w, size, pad) if crop == "pad" else random_resized_crop(rng, img_h, img_w)
        views.append((c, strong_params(rng, n_ops) if v == STRONG and strong_aug else None))
    return views[0][0], views[1][0], views[1][1]
