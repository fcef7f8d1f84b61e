"""The `dali` backend's host-side geometry (numpy only): the file-path table, the decoded region of the
host route, validation's resize and crop."""
from __future__ import annotations

import os

import numpy as np

from pipelines.upsample import centre_anchor, resized_hw


def path_table(files) -> np.ndarray:
    """(N, L) uint8: each row a path as the file system spells it, zero-padded; a batch of paths is one
    fancy index of it, and DALI's file reader takes the rows as they are."""
    return np.array([os.fsencode(f) for f in files], dtype=bytes).view(np.uint8).reshape(len(files), -1)


def roi(hw, boxes, align=16):
    """Union of each sample's crop boxes (N, V, 5) inside the image, widened to the JPEG MCU grid so the
    region decode reproduces the full decode's pixels (chroma upsampling needs the neighbouring blocks)."""
    h, w = hw[:, 0], hw[:, 1]
    y0 = np.maximum(0, boxes[:, :, 0].min(1))
    x0 = np.maximum(0, boxes[:, :, 1].min(1))
    y1 = np.minimum(h, (boxes[:, :, 0] + boxes[:, :, 2]).max(1))
    x1 = np.minimum(w, (boxes[:, :, 1] + boxes[:, :, 3]).max(1))
    y0, x0 = np.maximum(0, y0 // align * align - align), np.maximum(0, x0 // align * align - align)
    y1, x1 = np.minimum(h, -(-y1 // align) * align + align), np.minimum(w, -(-x1 // align) * align + align)
    return (a.astype(np.int32) for a in (y0, x0, y1, x1))


def val_geometry(hw, size, resize, resize_source=0):
    """Resize target (N, 2) float32 and centre-crop anchor (N, 2) int32, rounded as the torch backend does;
    with `resize_source`, the Resize(S) sizes and their centre squares (`pipelines.upsample`)."""
    if resize_source:
        target = resized_hw(hw, resize_source)
        return target.astype(np.float32), centre_anchor(target, size).astype(np.int32)
    h, w = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
    if resize:
        s = resize / np.minimum(w, h)
        nw, nh = np.maximum(size, np.rint(w * s)), np.maximum(size, np.rint(h * s))  # rint: Python's round
    else:
        nw, nh = np.full_like(w, size), np.full_like(h, size)
    anchor = np.stack([(nh - size) // 2, (nw - size) // 2], 1).astype(np.int32)
    return np.stack([nh, nw], 1).astype(np.float32), anchor
