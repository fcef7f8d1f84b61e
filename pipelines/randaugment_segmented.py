"""Batched, per-sample tensor implementation of the strong view (RandAugment + Cutout): the `segmented`
program of `pipeline.strong_program` (each op runs on the slice of the batch that drew it;
`pipelines.randaugment_graph` is the static-shape `graph` program built from the same ops).

Works on any torch device on uint8 or float batches, NCHW or NHWC. Each sample gets its own ops and
magnitudes (`StrongBatch`, built from `pipelines.view_params`, so a view is replayable). Every op
follows its PIL definition (`pipelines.randaugment_pil`) pixel for pixel up to float rounding:
the geometric ops use PIL's affine convention (sample at floor(A @ (x + 0.5, y + 0.5, 1)), black
outside, nearest), the enhancers blend with PIL's degenerate images and truncate like PIL's
`Image.blend`, Equalize/AutoContrast rebuild PIL's look-up tables. Tolerances are in the tests.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from pipelines.augment_spec import CUTOUT_FILL, STRONG_OPS
from pipelines.view_params import StrongDraws

OP_INDEX = {s.name: i for i, s in enumerate(STRONG_OPS)}


class StrongBatch(NamedTuple):
    """Per-sample strong-view parameters as tensors: ops (N, K) long, mags (N, K) float,
    cutout (N, 3) float = (side fraction, centre x, centre y)."""
    ops: torch.Tensor
    mags: torch.Tensor
    cutout: torch.Tensor

    @staticmethod
    def from_draws(strong: StrongDraws) -> "StrongBatch":
        """A batch's draws (`pipelines.view_params.strong_draws`), kept on the host: apply_strong_batch
        plans each round there and sends one index and one magnitude tensor per round."""
        return StrongBatch(torch.from_numpy(strong.ops), torch.from_numpy(strong.mags),
                           torch.from_numpy(strong.cutout))


# ---- helpers on uint8-valued float32 NCHW tensors --------------------------------------------------
# Every op below returns whole numbers in [0, 255] (PIL's ops yield uint8), which apply_strong_batch
# stores into uint8 without rounding; the per-op tests against PIL hold them to that.

def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, img, factor): truncation toward zero, clipped to [0, 255]."""
    # PIL's C code takes the factor as a C float: float32 arithmetic is the faithful (and fast) choice.
    out = degenerate + factor.to(img.dtype).view(-1, 1, 1, 1) * (img - degenerate)
    return out.clamp_(0, 255).floor_()


def _gray(img: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16."""
    r, g, b = img.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(img.dtype).unsqueeze(1)


def _lut(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) look-up table (N, C, 256) applied to img (N, C, H, W)."""
    n, c, h, w = img.shape
    idx = img.long().view(n, c, h * w)
    return torch.gather(lut.float(), 2, idx).view(n, c, h, w)


def _histogram(img: torch.Tensor) -> torch.Tensor:
    n, c, h, w = img.shape
    hist = torch.zeros(n, c, 256, device=img.device, dtype=torch.long)
    return hist.scatter_add_(2, img.long().view(n, c, h * w), torch.ones_like(img, dtype=torch.long).view(n, c, h * w))


def autocontrast_lut(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """PIL's AutoContrast look-up table (N, C, 256) from each channel's lowest and highest value (N, C, 1)."""
    ix = torch.arange(256, device=lo.device, dtype=torch.float64).view(1, 1, 256)
    span = (hi - lo).double().clamp(min=1)
    scale = torch.full_like(span, 255.0) / span  # true division (scalar / tensor is a reciprocal multiply)
    lut = (ix * scale + (-lo.double() * scale)).floor().clamp(0, 255)  # PIL: int(ix * scale + offset)
    return torch.where(hi > lo, lut, ix.expand_as(lut))


def autocontrast(img, _mag):
    lo = img.amin(dim=(2, 3), keepdim=True).squeeze(-1)  # (N, C, 1)
    hi = img.amax(dim=(2, 3), keepdim=True).squeeze(-1)
    return _lut(img, autocontrast_lut(lo, hi))


def equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """PIL's Equalize look-up table (N, C, 256) from each channel's histogram (N, C, 256)."""
    nonzero = hist > 0
    last = 255 - nonzero.flip(-1).long().argmax(-1, keepdim=True)  # highest bin present
    # Pillow >= 10 divides by 255 (older releases, used by the paper's code, by 256).
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    cum = torch.cumsum(hist, -1) - hist                      # exclusive cumulative sum
    lut = (step // 2 + cum) // step.clamp(min=1)
    ident = torch.arange(256, device=hist.device).expand_as(lut)
    keep = (nonzero.sum(-1, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep, ident, lut.clamp(0, 255))


def equalize(img, _mag):
    return _lut(img, equalize_lut(_histogram(img)))


def brightness(img, mag):
    return _blend(torch.zeros_like(img), img, mag)


def color(img, mag):
    return _blend(_gray(img).expand_as(img), img, mag)


def contrast_level(gray: torch.Tensor) -> torch.Tensor:
    """The Contrast op's degenerate grey level per sample (N, 1, 1, 1), from the L image."""
    return (gray.mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()


def contrast(img, mag):
    return _blend(contrast_level(_gray(img)).expand_as(img), img, mag)


# PIL's SMOOTH filter weights as C floats (1/13, 5/13 at the centre), as Python numbers: no tensor
# reads back to the host inside the augmenter (a CUDA graph could not hold one).
_ONE_13, _FIVE_13 = float(np.float32(1 / 13)), float(np.float32(5 / 13))


def smoothed(img):
    """PIL's SMOOTH filter, the Sharpness op's degenerate image: round half up, border kept."""
    _, _, h, w = img.shape
    if h < 3 or w < 3:  # all border: PIL keeps it, so the degenerate image is the image
        return img
    # The 8 neighbours' sum as a 3x3 sum-pool minus the centre: whole numbers below 2**24, so exact in
    # float32 in any order (one call instead of eight slice additions).
    centre = img[:, :, 1:-1, 1:-1]
    ring = torch.nn.functional.avg_pool2d(img, 3, stride=1, divisor_override=1) - centre
    smooth = ring * _ONE_13 + centre * _FIVE_13
    degenerate = img.clone()
    degenerate[:, :, 1:-1, 1:-1] = (smooth + 0.5).floor_().clamp_(0, 255)
    return degenerate


def sharpness(img, mag):
    return _blend(smoothed(img), img, mag)


def _levels(n: int, device) -> torch.Tensor:
    return torch.arange(256, device=device, dtype=torch.float32).expand(n, 256)


def posterize_lut(mag: torch.Tensor) -> torch.Tensor:
    """(N, 256): each level with its low 8 - bits bits cleared (PIL's posterize table)."""
    bits = mag.floor().clamp(1, 8).long().view(-1, 1)
    mask = (255 >> (8 - bits)) << (8 - bits)
    return (_levels(len(mag), mag.device).long() & mask).float()


def solarize_lut(mag: torch.Tensor) -> torch.Tensor:
    """(N, 256): levels at or above the threshold inverted (PIL's solarize table)."""
    ix = _levels(len(mag), mag.device)
    return torch.where(ix >= mag.view(-1, 1), 255.0 - ix, ix)


def posterize(img, mag):
    return _lut(img, posterize_lut(mag).unsqueeze(1).expand(-1, img.shape[1], -1))


def solarize(img, mag):
    return _lut(img, solarize_lut(mag).unsqueeze(1).expand(-1, img.shape[1], -1))


def identity(img, _mag):
    return img


def _affine(img: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """PIL Image.transform(AFFINE, (a, b, c, d, e, f), NEAREST): output (x, y) takes the input
    pixel at floor(a(x+.5) + b(y+.5) + c), floor(d(x+.5) + e(y+.5) + f); black outside.

    Like PIL, a pure scale/translate matrix is evaluated in double precision and any other one
    in 16.16 fixed point (PIL's `affine_fixed`), so rotations and shears round as PIL does. The
    source x and y are computed together as one (N, 2, H, W) tensor (each element with the same
    operations in the same order as separately): a third of the calls, which is what costs on a GPU."""
    n, ch, h, w = img.shape
    dev = img.device
    cf = coeffs.double()
    a, b, c = cf[:, 0::3].view(n, 2, 1, 1), cf[:, 1::3].view(n, 2, 1, 1), cf[:, 2::3].view(n, 2, 1, 1)  # x row, y row
    ys = torch.arange(h, device=dev, dtype=torch.float64).view(1, 1, h, 1)
    xs = torch.arange(w, device=dev, dtype=torch.float64).view(1, 1, 1, w)
    fixed = ((cf[:, 1] != 0) | (cf[:, 3] != 0)).view(n, 1, 1, 1)
    fix = lambda v: torch.floor(v * 65536.0 + 0.5).long()  # noqa: E731
    src_fix = (fix(c + a * 0.5 + b * 0.5) + xs.long() * fix(a) + ys.long() * fix(b)) >> 16
    src_flt = (a * (xs + 0.5) + b * (ys + 0.5) + c).floor().long()
    src = torch.where(fixed, src_fix, src_flt)                        # (N, 2, H, W): source x, source y
    # bounds as Python numbers: a tensor of them would be a host-to-device copy (and sync) per call
    valid = (src >= 0).all(1, keepdim=True) & (src[:, :1] < w) & (src[:, 1:] < h)  # (N, 1, H, W)
    src[:, 0].clamp_(0, w - 1)
    src[:, 1].clamp_(0, h - 1)
    flat = (src[:, 1] * w + src[:, 0]).view(n, 1, h * w).expand(n, ch, h * w)
    out = torch.gather(img.reshape(n, ch, h * w), 2, flat).view(n, ch, h, w)
    return out * valid


def _coeffs(n, dev, **kv):
    # the identity matrix built on the device: torch.tensor(..., device=cuda) would be a blocking copy
    base = torch.zeros(n, 6, dtype=torch.float64, device=dev)
    base[:, 0::4] = 1.0
    for i, v in kv.items():
        base[:, int(i[1:])] = v
    return base


def _shear_x(shape, mag):
    return _coeffs(len(mag), mag.device, c1=mag)


def _shear_y(shape, mag):
    return _coeffs(len(mag), mag.device, c3=mag)


def _translate_x(shape, mag):
    return _coeffs(len(mag), mag.device, c2=mag * shape[3])


def _translate_y(shape, mag):
    return _coeffs(len(mag), mag.device, c5=mag * shape[2])


def _rotate(shape, mag):
    """PIL Image.rotate(angle): counter-clockwise about the centre, same size, nearest."""
    h, w = shape[2], shape[3]
    ang = -torch.deg2rad(torch.remainder(mag.double(), 360.0))  # PIL: -radians(angle % 360)
    cos, sin = torch.round(torch.cos(ang), decimals=15), torch.round(torch.sin(ang), decimals=15)
    cx, cy = w / 2.0, h / 2.0
    # PIL: matrix (cos, sin, 0, -sin, cos, 0) applied about the centre.
    c = cos * (-cx) + sin * (-cy) + cx
    f = -sin * (-cx) + cos * (-cy) + cy
    return torch.stack([cos, sin, c, -sin, cos, f], 1)


# The geometric ops are one affine sampling each: apply_strong_batch runs all of a round's samples
# that drew any of them through a single _affine call (its per-call host cost dominated on a GPU).
AFFINE_COEFFS = {"ShearX": _shear_x, "ShearY": _shear_y, "TranslateX": _translate_x,
                 "TranslateY": _translate_y, "Rotate": _rotate}


# Sort key per op id for _round_plan: geometric ops first (adjacent), then the others, Identity last.
_SORT_KEY = torch.tensor([(0 if s.name in AFFINE_COEFFS else 2 if s.name == "Identity" else 1) * 100 + i
                          for i, s in enumerate(STRONG_OPS)])


def _geometric(name):
    return lambda img, mag: _affine(img, AFFINE_COEFFS[name](img.shape, mag))


shear_x, shear_y, translate_x, translate_y, rotate = (
    _geometric(n) for n in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"))


TENSOR_OPS = {
    "AutoContrast": autocontrast, "Brightness": brightness, "Color": color, "Contrast": contrast,
    "Equalize": equalize, "Identity": identity, "Posterize": posterize, "Rotate": rotate,
    "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y, "Solarize": solarize,
    "TranslateX": translate_x, "TranslateY": translate_y,
}
assert set(TENSOR_OPS) == set(OP_INDEX)


def cutout(img: torch.Tensor, cut: torch.Tensor, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PIL's CutoutAbs box: x0 = int(max(0, cx*w - v/2)), x1 = min(w, x0 + v), drawn inclusive of
    both corners (ImageDraw truncates float corners); v = frac * width; no box when frac == 0.
    `cut` (N, 3) = (side fraction, centre x, centre y) on img's device: one mask over the batch.
    `fill`: `fill_colour(...)`, made by the caller where the program must not create tensors from host data."""
    n, ch, h, w = img.shape
    frac, cx, cy = cut.double().unbind(1)
    v = frac * w
    x0 = (cx * w - v / 2).clamp(min=0).floor()
    y0 = (cy * h - v / 2).clamp(min=0).floor()
    x1 = torch.minimum(x0 + v, torch.full_like(v, w)).floor()
    y1 = torch.minimum(y0 + v, torch.full_like(v, h)).floor()
    xs = torch.arange(w, device=img.device).view(1, 1, w)
    ys = torch.arange(h, device=img.device).view(1, h, 1)
    inside = ((xs >= x0.view(n, 1, 1)) & (xs <= x1.view(n, 1, 1)) & (ys >= y0.view(n, 1, 1))
              & (ys <= y1.view(n, 1, 1)) & (frac > 0).view(n, 1, 1))
    return torch.where(inside.unsqueeze(1), fill_colour(img.device, img.dtype, ch) if fill is None else fill, img)


_FILLS = {}


def fill_colour(device, dtype, ch: int) -> torch.Tensor:
    """Cutout's colour as a (1, C, 1, 1) tensor, built once per device: torch.tensor(...).to(cuda) per
    batch would be a copy from pageable memory."""
    key = (device, dtype)
    if key not in _FILLS:
        _FILLS[key] = torch.tensor(CUTOUT_FILL, dtype=dtype).view(1, ch, 1, 1).to(device)
    return _FILLS[key]


def _round_plan(col: torch.Tensor):
    """Processing order for one round (host): samples grouped by op, the geometric ops adjacent
    (one affine call covers them), Identity last; returns (order, [(op name, start, end)])."""
    key = _SORT_KEY[col]
    order = torch.argsort(key, stable=True)
    ids, counts = torch.unique_consecutive(col[order], return_counts=True)
    segs, a = [], 0
    for op_id, c in zip(ids.tolist(), counts.tolist()):
        segs.append((STRONG_OPS[op_id].name, a, a + c))
        a += c
    return order, segs


def _rows_of(pos: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: rows[s] is the row of a batch laid out as `pos` that holds sample s."""
    rows = torch.empty_like(pos)
    rows[pos] = torch.arange(len(pos))
    return rows


def host_flat(parts, dev) -> torch.Tensor:
    """Host tensors as one float64 buffer, pinned when bound for CUDA (a copy from pageable memory waits
    for the stream; from pinned memory it is asynchronous). Indices below 2**53 are exact."""
    flat = torch.cat([p.reshape(-1).double() for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    return flat.pin_memory() if dev.type == "cuda" else flat


def _to_device(parts, dev):
    """Host tensors -> `dev` in a single copy (`host_flat`), then split there."""
    return host_flat(parts, dev).to(dev, non_blocking=True).split([p.numel() for p in parts])


def apply_strong_batch(x: torch.Tensor, params: StrongBatch, channels_last_input: bool = False) -> torch.Tensor:
    """Strong view of a batch. `x`: uint8, or float holding integers in [0, 255]; NCHW (or NHWC if
    `channels_last_input`). Returns a new tensor of the same dtype and layout.

    Between ops the batch is kept as uint8 (each PIL op yields uint8 too). Each round the batch is
    reordered once so that every op's samples are one contiguous slice: an op then reads and writes
    a view, with no per-op index lists, gathers or scatters. The plan (orders, magnitudes, Cutout
    boxes) is made on the host, where the parameters are, and sent to the device in one copy. On a
    GPU the cost of this function is the host's op-by-op dispatch, so fewer calls is the point: their
    number depends on the ops drawn, not on the batch size (docs/benchmarks.md)."""
    dtype = x.dtype
    img = x.permute(0, 3, 1, 2) if channels_last_input else x
    img = img.clone() if dtype == torch.uint8 else img.round().clamp(0, 255).to(torch.uint8)
    dev, n = img.device, img.shape[0]
    ops, mags = params.ops.cpu(), params.mags.cpu()
    pos = torch.arange(n)  # pos[r]: the sample now in row r of img
    rounds, parts = [], []
    for k in range(ops.shape[1]):
        order, segs = _round_plan(ops[:, k])
        if not segs or segs[0][0] == "Identity":  # an empty batch, or Identity (sorted last) only
            continue
        gather = not torch.equal(order, pos)
        if gather:
            parts.append(_rows_of(pos)[order])
            pos = order
        parts.append(mags[order, k])
        rounds.append((gather, segs))
    back = not torch.equal(pos, torch.arange(n))
    if back:
        parts.append(_rows_of(pos))
    parts.append(params.cutout.cpu())
    sent = list(_to_device(parts, dev))
    for gather, segs in rounds:
        if gather:
            img = img[sent.pop(0).long()]  # indexing keeps the memory format
        mk = sent.pop(0)
        geo_a, geo_b, geo_coeffs = None, None, []
        for name, a, b in segs:
            if name == "Identity":
                continue
            if name in AFFINE_COEFFS:
                geo_a = a if geo_a is None else geo_a
                geo_b = b
                geo_coeffs.append(AFFINE_COEFFS[name](img.shape, mk[a:b]))
                continue
            seg = img[a:b]  # every op returns whole numbers in [0, 255]: the uint8 store is exact
            seg.copy_(TENSOR_OPS[name](seg.float(), mk[a:b]))
        if geo_coeffs:  # nearest sampling of uint8 values: no rounding needed
            seg = img[geo_a:geo_b]
            seg.copy_(_affine(seg, torch.cat(geo_coeffs) if len(geo_coeffs) > 1 else geo_coeffs[0]))
    if back:  # to the caller's order
        img = img[sent.pop(0).long()]
    img = cutout(img, sent.pop(0).view(n, 3))
    out = img if dtype == torch.uint8 else img.to(dtype)
    return out.permute(0, 2, 3, 1) if channels_last_input else out
