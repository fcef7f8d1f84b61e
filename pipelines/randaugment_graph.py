"""The strong view as a static-shape program, and that program captured in a CUDA graph.

`apply_strong_batch` (pipelines.randaugment_segmented) plans each round on the host and runs every op on
the samples that drew it: little device work, but a few hundred launches per batch whose number and
shapes depend on the draw, so the host dispatches them one by one every batch. This module computes
the same views with a program whose launches and shapes depend only on the batch's shape: each round
runs the three op families over the whole batch and keeps, per sample, the family it drew —

- look-up-table ops (AutoContrast, Equalize, Posterize, Solarize, Identity): one histogram pass gives
  every sample's table, one gather applies it;
- blends with a degenerate image (Brightness, Color, Contrast, Sharpness): the degenerate image picked
  per sample, then one blend;
- affine ops (Rotate, Shear, Translate): the coefficient rows picked per sample, one affine sampling.

Every op's arithmetic is the segmented augmenter's own function, so the two agree bit for bit when run
eagerly (tests/test_augment_graph.py). The price is device work: every family runs over every sample.
On CUDA `StrongGraph` compiles the program (fused kernels) and captures it in a CUDA graph once per
batch shape, so a batch costs the host a copy of its parameters and one replay.
`pipeline.strong_program` chooses; docs/benchmarks.md has what is measured of each.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Optional

import torch

from pipelines.augment_spec import CUTOUT_FILL
from pipelines.randaugment_segmented import (AFFINE_COEFFS, OP_INDEX, StrongBatch, _affine, _blend, _gray,
                                             _histogram, _lut, _to_device, apply_strong_batch, autocontrast_lut,
                                             contrast_level, cutout, equalize_lut, fill_colour, host_flat,
                                             posterize_lut, smoothed, solarize_lut)

PROGRAMS = ("segmented", "graph")
_LUT_OPS = ("AutoContrast", "Equalize", "Posterize", "Solarize", "Identity")
_BLEND_OPS = ("Brightness", "Color", "Contrast", "Sharpness")
assert set(_LUT_OPS) | set(_BLEND_OPS) | set(AFFINE_COEFFS) == set(OP_INDEX)


def _is(op: torch.Tensor, name: str) -> torch.Tensor:
    return op == OP_INDEX[name]


def _pick(op: torch.Tensor, choices: dict, shape) -> torch.Tensor:
    """Per sample, the tensor of the op it drew among `choices` (name -> tensor); others get the last."""
    names = list(choices)
    out = choices[names[-1]]
    for name in names[:-1]:
        out = torch.where(_is(op, name).view(shape), choices[name], out)
    return out


def _lut_family(img: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    n, c = img.shape[:2]
    hist = _histogram(img)                                       # (N, C, 256)
    levels = torch.arange(256, device=img.device).view(1, 1, 256)
    present = hist > 0
    # lowest and highest value present: AutoContrast's min / max, read from the histogram
    lo = torch.where(present, levels, 256).amin(-1, keepdim=True).float()
    hi = torch.where(present, levels, -1).amax(-1, keepdim=True).float()
    per_channel = lambda t: t.unsqueeze(1).expand(n, c, 256)    # noqa: E731
    lut = _pick(op, {"AutoContrast": autocontrast_lut(lo, hi).float(), "Equalize": equalize_lut(hist).float(),
                     "Posterize": per_channel(posterize_lut(mag)), "Solarize": per_channel(solarize_lut(mag)),
                     "Identity": levels.float().expand(n, c, 256)}, (n, 1, 1))
    return _lut(img, lut)


def _blend_family(img: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    gray = _gray(img)
    degenerate = _pick(op, {"Color": gray.expand_as(img), "Contrast": contrast_level(gray).expand_as(img),
                            "Brightness": torch.zeros_like(img), "Sharpness": smoothed(img)}, (-1, 1, 1, 1))
    return _blend(degenerate, img, mag)


def _affine_family(img: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    coeffs = torch.zeros(len(op), 6, dtype=torch.float64, device=img.device)
    coeffs[:, 0::4] = 1.0  # the identity for samples of the other families (their result is not kept)
    for name, make in AFFINE_COEFFS.items():
        coeffs = torch.where(_is(op, name).view(-1, 1), make(img.shape, mag), coeffs)
    return _affine(img, coeffs)


def apply_strong_static(x: torch.Tensor, ops: torch.Tensor, mags: torch.Tensor, cut: torch.Tensor,
                        channels_last_input: bool = False, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`apply_strong_batch`'s result with every parameter a tensor on x's device (ops (N, K) integral,
    mags (N, K) and cut (N, 3) float64; `fill` the Cutout colour, `fill_colour` by default) and no host
    traffic: the sequence of launches is fixed by the shapes alone, which is what a CUDA graph needs."""
    dtype = x.dtype
    img = x.permute(0, 3, 1, 2) if channels_last_input else x
    img = img.clone() if dtype == torch.uint8 else img.round().clamp(0, 255).to(torch.uint8)
    ops = ops.long()
    for k in range(ops.shape[1]):
        op, mag, f = ops[:, k], mags[:, k], img.float()
        lut_drawn = sum(_is(op, name) for name in _LUT_OPS).bool().view(-1, 1, 1, 1)
        blend_drawn = sum(_is(op, name) for name in _BLEND_OPS).bool().view(-1, 1, 1, 1)
        out = torch.where(lut_drawn, _lut_family(f, op, mag),
                          torch.where(blend_drawn, _blend_family(f, op, mag), _affine_family(img, op, mag)))
        img = out.to(torch.uint8)  # every family yields whole numbers in [0, 255] (or the uint8 input)
    img = cutout(img, cut, fill)
    out = img if dtype == torch.uint8 else img.to(dtype)
    return out.permute(0, 2, 3, 1).contiguous() if channels_last_input else out


class StrongGraph:
    """`apply_strong_static`, compiled (torch.compile fuses its elementwise chains, which is what makes
    running every family over every sample affordable) and captured in a CUDA graph per batch shape,
    then replayed: per batch the host enqueues a copy of the input into the graph's buffer, one copy
    of the parameters (from pinned memory, asynchronous), the replay, and a copy out (the caller keeps
    its batch while the next one is made). Off CUDA the program runs eagerly (`compile=True` compiles
    it there too, for the tests), so the same code path runs on a CPU. Each captured shape holds its
    own memory pool; a shape is compiled and captured when it comes a second time, up to `max_graphs` shapes:
    the full batch at once, while a ragged last batch (which comes first in a run resumed at an epoch's last
    batch) returns only an epoch later, when the full batch holds the slot. A shape's first batch, and every
    batch of a shape beyond the slots, runs the program eagerly, with no compilation for it."""

    def __init__(self, compile: Optional[bool] = None, max_graphs: int = 1):
        self.compile, self.max_graphs, self.graphs, self._compiled = compile, max_graphs, {}, None
        self.seen = set()

    def _program(self, device: torch.device):
        if not (self.compile if self.compile is not None else device.type == "cuda"):
            return apply_strong_static
        if self._compiled is None:
            # emulate_precision_casts: no fused multiply-adds in the generated kernels, whose single
            # rounding would move a blend's result across a floor now and then (eager arithmetic kept)
            self._compiled = torch.compile(apply_strong_static, dynamic=False, fullgraph=True,
                                           options={"emulate_precision_casts": True})
        return self._compiled

    def __call__(self, x: torch.Tensor, params: StrongBatch, channels_last_input: bool = False) -> torch.Tensor:
        k = params.ops.shape[1]
        key = (tuple(x.shape), x.dtype, x.device, k, channels_last_input)
        program = apply_strong_static
        if key not in self.graphs and key in self.seen and len(self.graphs) < self.max_graphs:
            self.graphs[key] = _Captured(self._program(x.device), x, k, channels_last_input) if x.is_cuda else None
        self.seen.add(key)
        if key in self.graphs:
            if self.graphs[key] is not None:
                return self.graphs[key].run(x, params)
            program = self._program(x.device)  # off CUDA: compiled when asked to, not captured
        ops, mags, cut = _to_device([params.ops, params.mags, params.cutout], x.device)
        fill = fill_colour(x.device, torch.uint8, len(CUTOUT_FILL))
        return program(x, ops.view(-1, k), mags.view(-1, k), cut.view(-1, 3), channels_last_input, fill)


@contextlib.contextmanager
def _no_collection():
    """No garbage collection during a capture: a finaliser run then (freeing a CUDA tensor or event made
    on another stream, a DALI or FFCV object) would touch CUDA in a way a capture forbids and abort it.
    The garbage there is beforehand is collected first, so that none piles up meanwhile."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Captured:
    def __init__(self, fn, x: torch.Tensor, k: int, channels_last_input: bool):
        with torch.cuda.device(x.device):  # the capture's stream and pool belong to the current device
            self._capture(fn, x, k, channels_last_input)

    def _capture(self, fn, x: torch.Tensor, k: int, channels_last_input: bool):
        n, dev = x.shape[0], x.device
        self.x = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.flat = torch.zeros(n * (2 * k + 3), dtype=torch.float64, device=dev)
        ops, mags, cut = self.flat.split([n * k, n * k, n * 3])
        ops, mags, cut = ops.view(n, k), mags.view(n, k), cut.view(n, 3)
        self.x.copy_(x)
        fill = fill_colour(dev, torch.uint8, len(CUTOUT_FILL))  # an input made outside: no upload inside the capture
        program = lambda: fn(self.x, ops, mags, cut, channels_last_input, fill)  # noqa: E731
        # Warm-up on a side stream before capture, as torch.cuda.graphs asks: compilation must not happen
        # inside the capture.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            program()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's and the allocator's own threads keep using CUDA while this thread captures
        with _no_collection(), torch.cuda.graph(self.graph, stream=torch.cuda.Stream(dev),
                                                 capture_error_mode="thread_local"):
            self.out = program()
        self.stream = torch.cuda.current_stream(dev)

    def run(self, x: torch.Tensor, params: StrongBatch) -> torch.Tensor:
        stream = torch.cuda.current_stream(x.device)
        if stream != self.stream:  # the static buffers are reused: after the last batch's work, wherever it ran
            stream.wait_stream(self.stream)
            self.stream = stream
        self.x.copy_(x)
        self.flat.copy_(host_flat([params.ops, params.mags, params.cutout], x.device), non_blocking=True)
        self.graph.replay()
        return self.out.clone()


def strong_program(name: str):
    """The strong-view function for `pipeline.strong_program` (one of PROGRAMS; both have
    apply_strong_batch's call)."""
    return apply_strong_batch if name == "segmented" else StrongGraph()
