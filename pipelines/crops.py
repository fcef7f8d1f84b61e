"""Crop + resize + flip of one decoded uint8 HWC image on the host, from replayable `Crop` boxes.

Used by backends that decode with a fast library and cut views on the CPU. torch's uint8
channels-last antialiased bilinear resize follows PIL's filter (the reference backend) and is
faster than both PIL's and DALI's CPU resize (docs/benchmarks.md).
"""
from typing import Optional

import numpy as np
import torch

from pipelines.view_params import Crop

_resize_aa = torch.ops.aten._upsample_bilinear2d_aa.out


def crop_resize(img: np.ndarray, c: Crop, size: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 HWC numpy image -> contiguous uint8 (size, size, 3) tensor (written into `out` if given);
    boxes may leave the image (zero fill)."""
    h, w = img.shape[:2]
    y0, x0, y1, x1 = max(c.top, 0), max(c.left, 0), min(c.top + c.height, h), min(c.left + c.width, w)
    src = torch.from_numpy(np.ascontiguousarray(img[y0:y1, x0:x1]))
    out = torch.empty((size, size, 3), dtype=torch.uint8) if out is None else out
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
