"""`data.resize_source`: each source image resized before its views are cut, as the released code's
Tiny-ImageNet-at-384 transforms do (torchvision's `Resize(S, InterpolationMode.BICUBIC)` on the PIL image,
before RandomCrop / ToTensor): the shorter side to S, the longer one to int(S * long / short), PIL's
BICUBIC filter. Validation: that resize, then the centre `data.image_size` square.

Host code resizes with PIL itself (`resize_pil`, `resize_array`). `resize_batch` is PIL's fixed-point
two-pass algorithm (Pillow's Resample.c) in integer tensor ops, for batches already on the device: the
same pixels as PIL bit for bit on any device (torch's own uint8 bicubic resize differs from PIL in ~0.5% of
pixels, its float one by up to 24 levels on noise, docs/design.md), and the native pixels stay resident
until a batch needs them.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image

_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2


def resized_hw(hw, s: int) -> np.ndarray:
    """(..., 2) height, width after Resize(s): torchvision's `_compute_resized_output_size`."""
    hw = np.asarray(hw, dtype=np.int64)
    h, w = hw[..., 0], hw[..., 1]
    long = (s * np.maximum(h, w)) // np.maximum(np.minimum(h, w), 1)  # == int(s * long / short) for ints
    return np.stack([np.where(w <= h, long, s), np.where(w <= h, s, long)], -1)


def centre_anchor(hw, size: int) -> np.ndarray:
    """(..., 2) top, left of the centre size x size square (torchvision's CenterCrop rounding)."""
    hw = np.asarray(hw, dtype=np.int64)
    return np.stack([np.rint((hw[..., 0] - size) / 2.0), np.rint((hw[..., 1] - size) / 2.0)], -1).astype(np.int64)


def resize_pil(img: Image.Image, s: int) -> Image.Image:
    h, w = resized_hw((img.size[1], img.size[0]), s).tolist()
    return img if (w, h) == img.size else img.resize((w, h), Image.BICUBIC)


def resize_array(arr: np.ndarray, s: int) -> np.ndarray:
    """One decoded uint8 HWC image through `resize_pil` (PIL's resize releases the GIL)."""
    return np.array(resize_pil(Image.fromarray(arr), s))  # writable: torch takes views of it


def val_view_pil(img: Image.Image, s: int, size: int) -> Image.Image:
    img = resize_pil(img, s)
    top, left = centre_anchor((img.size[1], img.size[0]), size).tolist()
    return img if img.size == (size, size) else img.crop((left, top, left + size, top + size))


def _bicubic(x: float) -> float:
    a = -0.5  # Pillow's bicubic_filter, evaluated in the same order (doubles, as in C)
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def _coefficients(n_in: int, n_out: int):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc: (n_out, K) source positions and int weights."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    k_size = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((n_out, k_size), dtype=np.int64)
    wts = np.zeros((n_out, k_size), dtype=np.int64)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in) - xmin
        k = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in k:
            ww += v
        for x, v in enumerate(k):
            v = v / ww if ww != 0.0 else v
            wts[xx, x] = int(-0.5 + v * (1 << _BITS)) if v < 0 else int(0.5 + v * (1 << _BITS))
            idx[xx, x] = xmin + x
        idx[xx, xmax:] = xmin
    return idx, wts


def _pass(x: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """One of Pillow's passes along `dim` of an int32 tensor of 0..255 values: int32 sums (the weights'
    magnitudes sum to < 1.2 * 2^22, so 255 times that fits), rounded and clipped as Pillow's clip8."""
    idx, wts = _coefficients(x.shape[dim], n_out)
    shape = [1] * x.dim()
    shape[dim] = n_out
    out_shape = list(x.shape)
    out_shape[dim] = n_out
    acc = torch.full(out_shape, 1 << (_BITS - 1), dtype=torch.int32, device=x.device)
    idx_t = torch.from_numpy(idx).to(x.device)
    wts_t = torch.from_numpy(wts.astype(np.int32)).to(x.device)
    for k in range(idx.shape[1]):
        acc += x.index_select(dim, idx_t[:, k]) * wts_t[:, k].view(shape)
    return (acc >> _BITS).clamp_(0, 255)


@functools.lru_cache(maxsize=64)
def _vertical_first(in_hw, out_hw) -> bool:
    """The order of Pillow's two passes for this size pair, learnt once from PIL on a noise image (where
    the orders differ in about a quarter of the pixels): Pillow 13 runs the vertical pass first for some
    reductions, and its rule is not part of its interface."""
    probe = np.random.default_rng(0).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    want = torch.from_numpy(np.array(Image.fromarray(probe).resize(out_hw[::-1], Image.BICUBIC)))
    x = torch.from_numpy(probe)[None].to(torch.int32)
    for vertical_first in (False, True):
        if torch.equal(_passes(x, out_hw, vertical_first)[0].to(torch.uint8), want):
            return vertical_first
    raise RuntimeError(f"PIL's bicubic resize {in_hw} -> {out_hw} is not reproduced: this Pillow's "
                       f"resampling differs from the algorithm in pipelines/upsample.py")


def _passes(y: torch.Tensor, out_hw, vertical_first: bool) -> torch.Tensor:
    passes = [(out_hw[1], 2), (out_hw[0], 1)]
    for n, dim in (passes[::-1] if vertical_first else passes):
        if n != y.shape[dim]:
            y = _pass(y, n, dim)
    return y


def resize_batch(x: torch.Tensor, hw) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, h, w, C), each image as PIL's `resize((w, h), BICUBIC)`: two
    passes, each skipped when its side keeps its length."""
    in_hw, out_hw = (int(x.shape[1]), int(x.shape[2])), (int(hw[0]), int(hw[1]))
    if in_hw == out_hw:
        return x
    return _passes(x.to(torch.int32), out_hw, _vertical_first(in_hw, out_hw)).to(torch.uint8)
