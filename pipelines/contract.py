"""The batch contract every backend (torch, dali, ffcv) follows.

Training batches are `Batch(weak, strong, target, index)`:
  weak, strong  the training dtype (float32; bf16/fp16 under `run.amp`, the fp32 values rounded once:
                the autocast dtype the first conv casts to anyway), shape (N, 3, H, W),
                `torch.channels_last` memory format, on the training device, normalised as
                (x / 255 - mean) / std with the dataset's mean/std; H = W = `data.image_size`.
  target        int64, shape (N,), class index in the sorted class list of the source.
  index         int64, shape (N,), the sample's position in the source's canonical order
                (`pipelines.sources`), so (epoch, index, view) identifies a view exactly.
  index_host    the same indices on the host (CPU int64): consumers such as the teacher cache read
                with them without waiting for the device. Optional for hand-made batches (None).
A backend built with `views=1` (single-view methods: ce, kd, dkd) yields `strong=None` and skips
the strong augmentation entirely.
Validation batches are `ValBatch(image, target, index)` with the same conventions.
Backends do the uint8 -> float conversion and normalisation on the device, after the copy; on the host
route they normalise on the host and copy the float views to the device (`pipelines.device`).
"""
from typing import Iterator, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch


class Batch(NamedTuple):
    weak: torch.Tensor
    strong: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor
    index_host: Optional[torch.Tensor] = None


class ValBatch(NamedTuple):
    image: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor


@runtime_checkable
class Loader(Protocol):
    """What a backend's `build_train` / `build_val` returns (and `pipelines.prefetch` wraps): `len` batches
    per epoch; `set_epoch(e)` before iterating selects epoch e's order and views (a pure function of seed,
    epoch, index, view, so any epoch can be asked for, in any order), and `set_epoch(e, start=b)` makes the
    next iteration begin at that epoch's batch b (a run resumed mid-epoch: the same batches as from the
    start, the first b left out); iterating yields `Batch`es (training loaders) or `ValBatch`es (validation
    loaders). Leaving an iteration early is allowed: the next one starts the asked-for epoch afresh."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Union[Batch, ValBatch]]: ...
