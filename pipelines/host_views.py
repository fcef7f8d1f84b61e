"""Strong-view augmentation for backends that hand uint8 views over from the CPU (ffcv, dali).

On a GPU the batch goes to the device and through the batched tensor augmenter. On a CPU the ops
run per sample in PIL on a small thread pool: pixel-identical to the tensor ops (tests) and ~5x
faster than them on a CPU (docs/benchmarks.md); PIL's kernels release the GIL.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from pipelines.crops import crop_resize
from pipelines.randaugment_pil import apply_strong
from pipelines.randaugment_tensor import StrongBatch, apply_strong_batch

_POOLS = {}


def pool(threads: int = 0) -> ThreadPoolExecutor:
    """One thread per usable core by default (more threads mostly contend for the GIL:
    docs/benchmarks.md); each keeps a single
    intra-op torch thread (a per-thread OpenMP setting) so nested parallel regions do not
    oversubscribe the cores."""
    threads = threads or min(16, len(os.sched_getaffinity(0)))
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="views",
                                             initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[threads]


def batched_on_device(device: torch.device) -> bool:
    """The accelerator route: uint8 views to the device, batched tensor augmenter and normalisation
    there. Otherwise (a CPU) per-sample PIL ops on the host pool. Tests force it to run the GPU
    route's code on a CPU."""
    return device.type != "cpu"


def strong_pil(view: torch.Tensor, params) -> torch.Tensor:
    """One uint8 HWC view through the PIL definition (frombuffer shares the tensor's memory)."""
    size_hw = (view.shape[1], view.shape[0])
    pil = Image.frombuffer("RGB", size_hw, view.contiguous().numpy(), "raw", "RGB", 0, 1)
    return torch.from_numpy(np.array(apply_strong(pil, params)))


def strong_on_host(x: torch.Tensor, params, device: torch.device, enabled: bool = True) -> torch.Tensor:
    """uint8 (N, H, W, 3) strong-view crops -> augmented uint8 (N, H, W, 3) on `device`."""
    if not enabled or all(p is None for p in params):
        return x.to(device, non_blocking=True)
    if batched_on_device(device):
        return apply_strong_batch(x.to(device, non_blocking=True), StrongBatch.from_params(params, device),
                                  channels_last_input=True)
    out = torch.empty_like(x)

    def work(j):
        out[j] = strong_pil(x[j], params[j]) if params[j] is not None else x[j]

    list(pool().map(work, range(len(params))))
    return out


def _cut_pairs(images, params, size, views, threads):
    out = torch.empty((len(params), views, size, size, 3), dtype=torch.uint8)

    def work(j):
        for k in range(views):
            crop_resize(images[j], params[j][k], size, out=out[j, k])

    list(pool(threads).map(work, range(len(params))))
    return out


def finish_pairs(x: torch.Tensor, params, normalize, views: int, strong_enabled: bool = True):
    """uint8 (N, 2, H, W, 3) weak/strong crops -> normalised float (weak, strong) NCHW channels-last.

    On a GPU: one copy to the device, batched tensor augmenter, batched normalisation. On a CPU: per
    sample on the host pool (contiguous per-sample slices normalise ~4x faster than the strided
    batch, and the PIL ops run beside them)."""
    dev = normalize.device
    if batched_on_device(dev):
        x = x.to(dev, non_blocking=True)
        weak = normalize(x[:, 0])
        if views == 1:
            return weak, None
        return weak, normalize(strong_on_host(x[:, 1], params, dev, strong_enabled))

    def pair(j):
        if views == 1:
            return x[j, 0], None
        return x[j, 0], x[j, 1] if not strong_enabled or params[j] is None else strong_pil(x[j, 1], params[j])

    return _normalised_on_host(x.shape[0], x.shape[2:4], views, normalize, pair)


def _normalised_on_host(n, hw, views, normalize, pair, threads: int = 0):
    """Per sample on the host pool: `pair(j)` gives sample j's uint8 HWC (weak, strong or None), each
    normalised into its row of one NHWC buffer per view (contiguous per-sample slices normalise faster
    than the strided batch). Returned as NCHW views: channels-last memory, as the contract asks."""
    weak = torch.empty((n, *hw, 3), dtype=normalize.dtype)
    strong = torch.empty_like(weak) if views == 2 else None

    def work(j):
        w, s = pair(j)
        normalize.into(w, weak[j])
        if strong is not None:
            normalize.into(s, strong[j])

    list(pool(threads).map(work, range(n)))
    return weak.permute(0, 3, 1, 2), (None if strong is None else strong.permute(0, 3, 1, 2))


def views_from_decoded(images, params, size: int, views: int, normalize, threads: int = 0):
    """Decoded uint8 HWC images (one per sample, any size) -> normalised float (weak, strong) NCHW
    channels-last on normalize's device. `params[j]` is sample j's (weak Crop, strong Crop, StrongParams).

    CPU: per sample on the host pool, both views cut, the strong one through PIL, normalised. GPU: uint8
    views cut on the host, then `finish_pairs` (one copy, batched augmenter and normalisation there)."""
    if batched_on_device(normalize.device):
        pairs = _cut_pairs(images, params, size, views, threads)
        return finish_pairs(pairs, [p[2] for p in params], normalize, views)
    def pair(j):  # cutting and normalising per sample keeps that work in the pool, off the main thread
        wc, sc, sp = params[j]
        weak = crop_resize(images[j], wc, size)
        if views == 1:
            return weak, None
        v = crop_resize(images[j], sc, size)
        return weak, v if sp is None else strong_pil(v, sp)

    return _normalised_on_host(len(params), (size, size), views, normalize, pair, threads)
