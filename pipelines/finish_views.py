"""Views finished from decoded crops or images, for backends that decode with a fast library (ffcv, dali):
the strong view's augmentation, normalisation, and on the host route the crops too.

The route (`pipelines.device.on_device`) is decided once by `pipelines.build_loaders` and passed to the
backend, which picks its finishing functions when it is built (`pair_finisher`). Accelerator
route: uint8 views go to the device in one copy, the strong view through the batched tensor augmenter
and both through normalisation there; the Python work per batch does not grow with the batch. Host
route (the fast one on a CPU): per sample on a small thread pool, the strong ops in PIL (pixel-identical
to the tensor ops, tests; several times faster than them on a CPU, docs/benchmarks.md); PIL's kernels
release the GIL.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
from PIL import Image

from pipelines.device import to_device
from pipelines.randaugment_pil import apply_strong
from pipelines.randaugment_segmented import StrongBatch, apply_strong_batch
from pipelines.upsample import resize_array
from pipelines.view_params import STRONG, WEAK, Crop, StrongDraws, ViewBatch

_POOLS = {}
_resize_aa = torch.ops.aten._upsample_bilinear2d_aa.out


def pool(threads: int) -> ThreadPoolExecutor:
    """The host pool of `threads` threads (the run's CPU plan, `pipelines.cpu_plan`); each keeps a single
    intra-op torch thread (a per-thread OpenMP setting) so nested parallel regions do not
    oversubscribe the cores."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="views",
                                             initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[threads]


def strong_pil(view: torch.Tensor, params) -> torch.Tensor:
    """One uint8 HWC view through the PIL definition (frombuffer shares the tensor's memory)."""
    size_hw = (view.shape[1], view.shape[0])
    pil = Image.frombuffer("RGB", size_hw, view.contiguous().numpy(), "raw", "RGB", 0, 1)
    return torch.from_numpy(np.array(apply_strong(pil, params)))


def strong_on_device(x: torch.Tensor, strong: Optional[StrongDraws], device: torch.device,
                     program=apply_strong_batch) -> torch.Tensor:
    """Accelerator route: uint8 (N, H, W, 3) strong-view crops (host or device) -> augmented uint8
    (N, H, W, 3) on `device` through the batched tensor augmenter `program`
    (`pipelines.randaugment_graph.strong_program`); `strong` None: crop and flip only."""
    x = to_device(x, device)
    if strong is None:
        return x
    return program(x, StrongBatch.from_draws(strong), channels_last_input=True)


def finish_pairs_on_device(x: torch.Tensor, strong: Optional[StrongDraws], normalize, views: int,
                           program=apply_strong_batch):
    """Accelerator route: uint8 (N, 2, H, W, 3) weak/strong crops on the host -> normalised (weak, strong)
    NCHW channels-last: one copy to the device, batched tensor augmenter, batched normalisation."""
    x = to_device(x, normalize.device)
    weak = normalize(x[:, 0])
    if views == 1:
        return weak, None
    return weak, normalize(strong_on_device(x[:, 1], strong, normalize.device, program))


def finish_pairs_on_host(x: torch.Tensor, strong: Optional[StrongDraws], normalize, views: int, threads: int):
    """Host route: the same, per sample on the host pool (contiguous per-sample slices normalise faster
    than the strided batch, and the PIL ops run beside them)."""
    def pair(j):
        if views == 1:
            return x[j, 0], None
        return x[j, 0], x[j, 1] if strong is None else strong_pil(x[j, 1], strong.params(j))

    return _normalised_on_host(x.shape[0], x.shape[2:4], views, normalize, pair, threads)


def pair_finisher(device_route: bool, threads: int, program=apply_strong_batch):
    """The route's `finish(x, strong, normalize, views)` for uint8 (N, 2, H, W, 3) crop pairs, picked once
    when a loader is built (no per-batch branch on the route); the host route's on `threads` threads."""
    if device_route:
        return functools.partial(finish_pairs_on_device, program=program)
    return functools.partial(finish_pairs_on_host, threads=threads)


def _normalised_on_host(n, hw, views, normalize, pair, threads: int):
    """Per sample on the host pool: `pair(j)` gives sample j's uint8 HWC (weak, strong or None), each
    normalised into its row of one NHWC buffer per view (contiguous per-sample slices normalise faster
    than the strided batch). Returned on the training device as NCHW views: channels-last memory, as the
    contract asks."""
    dev = normalize.device

    def buffer():  # pinned from the start on CUDA: the copy to the device needs no staging copy
        return torch.empty((n, *hw, 3), dtype=normalize.dtype, pin_memory=dev.type == "cuda")

    weak, strong = buffer(), (buffer() if views == 2 else None)

    def work(j):
        w, s = pair(j)
        normalize.into(w, weak[j])
        if strong is not None:
            normalize.into(s, strong[j])

    list(pool(threads).map(work, range(n)))
    # moved as the contiguous NHWC buffers, permuted on the device: the layout survives the copy
    weak = to_device(weak, dev).permute(0, 3, 1, 2)
    return weak, (None if strong is None else to_device(strong, dev).permute(0, 3, 1, 2))


def crop_resize(img: np.ndarray, c: Crop, size: int) -> torch.Tensor:
    """Crop + resize + flip of one decoded uint8 HWC numpy image -> contiguous uint8 (size, size, 3) tensor;
    boxes may leave the image (zero fill). torch's uint8 channels-last antialiased bilinear resize follows
    PIL's filter (the reference backend) and is faster than both PIL's and DALI's CPU resize
    (docs/benchmarks.md)."""
    h, w = img.shape[:2]
    y0, x0, y1, x1 = max(c.top, 0), max(c.left, 0), min(c.top + c.height, h), min(c.left + c.width, w)
    src = torch.from_numpy(np.ascontiguousarray(img[y0:y1, x0:x1]))
    out = torch.empty((size, size, 3), dtype=torch.uint8)
    if c.height == size and c.width == size:
        out.zero_()
        out[y0 - c.top:y1 - c.top, x0 - c.left:x1 - c.left] = src
    else:  # resized crops (RandomResizedCrop) lie inside the image by construction
        # The resize written straight into HWC memory: F.interpolate returns NCHW for one image, and
        # turning that back into HWC costs more than the resize itself (docs/benchmarks.md).
        _resize_aa(src.permute(2, 0, 1)[None], [size, size], False, None, None, out=out.permute(2, 0, 1)[None])
    if c.flip:
        out.copy_(out.flip(1))
    return out


def views_from_decoded(images, vb: ViewBatch, size: int, views: int, normalize, threads: int,
                       resize: int = 0):
    """Host route: decoded uint8 HWC images (one per sample, any size) -> normalised float (weak, strong)
    NCHW channels-last. Per sample on the host pool: the image resized first when `resize`
    (`data.resize_source`, PIL's filter: the reference's pixels), both views cut from `vb`'s boxes, the
    strong one through PIL, normalised (cutting and normalising there keeps that work off the main thread)."""
    def pair(j):
        img = resize_array(images[j], resize) if resize else images[j]
        weak = crop_resize(img, vb.crop(j, WEAK), size)
        if views == 1:
            return weak, None
        v = crop_resize(img, vb.crop(j, STRONG), size)
        return weak, v if vb.strong is None else strong_pil(v, vb.strong.params(j))

    return _normalised_on_host(len(images), (size, size), views, normalize, pair, threads)


def crop_pairs(images, vb: ViewBatch, size: int, resize: int, threads: int) -> torch.Tensor:
    """Decoded uint8 HWC images -> uint8 (N, 2, size, size, 3) weak / strong crops, each image resized first
    as `views_from_decoded` does, per sample on the host pool: for a device route whose compiled cutter has
    no PIL-exact bicubic resize (ffcv), the views then finished on the device."""
    out = torch.empty((len(images), 2, size, size, 3), dtype=torch.uint8)

    def cut(j):
        img = resize_array(images[j], resize) if resize else images[j]
        for v in (WEAK, STRONG):
            out[j, v] = crop_resize(img, vb.crop(j, v), size)

    list(pool(threads).map(cut, range(len(images))))
    return out
