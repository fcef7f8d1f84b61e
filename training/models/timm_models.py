"""Any timm architecture as a teacher or student: `timm:<arch>` with `<arch>` one of `timm.list_models()`
(`timm:vit_large_patch16_384`, `timm:resnet18`; timm's tiny `timm:test_vit`, `timm:test_efficientnet` suit tests).

Built with `pretrained=False` and the run's class count: weights come only from a local `teacher.ckpt` /
`model.ckpt` file, never from the network. timm is imported only when such a name is used (~3 s).
"""
from __future__ import annotations

import difflib
import functools
from typing import Optional

import torch
import torch.nn as nn

PREFIX = "timm:"


def is_timm(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


@functools.lru_cache(maxsize=1)
def architectures() -> frozenset:
    import timm
    return frozenset(timm.list_models())


def name_problem(name: str) -> Optional[str]:
    """Why `timm:<arch>` names no timm architecture (with the nearest one), or None."""
    arch = name[len(PREFIX):]
    names = architectures()
    if arch in names:
        return None
    base = arch.split(".", 1)[0]  # `arch.tag`: a pretrained tag only picks weights to download
    near = [base] if base in names else difflib.get_close_matches(arch, sorted(names), n=1, cutoff=0.5)
    hint = f" (did you mean '{PREFIX}{near[0]}'?)" if near else ""
    return f"unknown timm architecture '{arch}'{hint}; see timm.list_models()"


def create(name: str, num_classes: int) -> nn.Module:
    import timm
    return timm.create_model(name[len(PREFIX):], pretrained=False, num_classes=num_classes)


def _dry_run(arch: str, size: int) -> Optional[str]:
    """The first line of what a forward of one `size` px image raises, or None. On the meta device: shapes
    only, no weights or arithmetic, so a ViT-L costs a fraction of a second."""
    import timm
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=2).eval()
            with torch.no_grad():
                model(torch.empty(1, 3, size, size))
    except Exception as e:  # whatever the architecture asserts or fails on: the message says which
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


@functools.lru_cache(maxsize=64)
def input_size_problem(name: str, image_size: int) -> Optional[str]:
    """Why `timm:<arch>` cannot take `image_size` px inputs (a ViT's fixed patch grid and position table, a
    Swin's windows), or None. Judged by a meta-device forward; where even the architecture's own default
    size fails there (an op without a meta kernel), nothing is claimed."""
    import timm
    arch = name[len(PREFIX):]
    problem = _dry_run(arch, image_size)
    if problem is None:
        return None
    default = timm.get_pretrained_cfg_value(arch, "input_size") or (3, 224, 224)
    if default[-1] == image_size or _dry_run(arch, default[-1]) is not None:
        return None
    return (f"{name} cannot take {image_size} px inputs ({problem}); its default input size is "
            f"{default[-2]}x{default[-1]} (data.image_size={default[-1]})")
