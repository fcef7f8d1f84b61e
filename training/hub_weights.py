"""torchvision's pretrained weights as a checkpoint: `teacher.ckpt=torchvision:IMAGENET1K_V1`.

    python train.py --config configs/imagenet/crld/r34_r18.yaml teacher.ckpt=torchvision:IMAGENET1K_V1
    python eval.py --model imagenet_resnet50 --dataset imagenet --data data/imagenet --ckpt torchvision:DEFAULT

`torchvision:<member>` names a member of the architecture's weights enum (`ResNet34_Weights.IMAGENET1K_V1`,
`DEFAULT` included). torchvision's weights API gives the URL and loads the file through torch's hub cache,
`$TORCH_HOME/hub/checkpoints/<file name of the URL>` (TORCH_HOME defaults to ~/.cache/torch); a file
already there is used as is, one that is missing is downloaded there. Offline, place the file at that
path by hand: the error names the URL and the path.
"""
from __future__ import annotations

import difflib
import os
import sys
from typing import Optional
from urllib.parse import urlparse

import torch

from common.errors import CheckpointError
from training.models.imagenet import TORCHVISION_NAMES

PREFIX = "torchvision:"


class HubWeightsError(CheckpointError):
    """A `torchvision:` weights spec that cannot be used; the message names the spec and the key."""


def is_hub_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def hub_weights(spec: str, arch: str, num_classes: Optional[int] = None, key: str = "teacher.ckpt"):
    """The torchvision weights enum member `spec` names for our model `arch` (no file access)."""
    import torchvision  # lazily: see training/models/imagenet.py

    member = spec[len(PREFIX):]
    tv_name = TORCHVISION_NAMES.get(arch)
    if tv_name is None:
        raise HubWeightsError(f"{key}={spec}: model '{arch}' has no torchvision weights (those exist for "
                              f"{', '.join(TORCHVISION_NAMES)})")
    enum = torchvision.models.get_model_weights(tv_name)
    if member not in enum.__members__:
        near = difflib.get_close_matches(member, enum.__members__, n=1)
        raise HubWeightsError(f"{key}={spec}: {enum.__name__} has no member '{member}'"
                              + (f" (did you mean '{near[0]}'?)" if near else "")
                              + f"; choose from {', '.join(enum.__members__)}")
    weights = enum[member]
    have = len(weights.meta["categories"])
    if num_classes is not None and have != num_classes:
        raise HubWeightsError(f"{key}={spec}: {weights!r} has {have} classes but data.num_classes={num_classes}")
    return weights


def cached_file(weights) -> str:
    """Where torch.hub keeps (and looks for) this weights file: the path a user can place it at."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def hub_state_dict(spec: str, arch: str, key: str = "teacher.ckpt") -> dict:
    """The state dict through torchvision's weights API: from the hub cache, downloaded there if missing."""
    weights = hub_weights(spec, arch, key=key)
    path = cached_file(weights)
    present = os.path.isfile(path)
    try:
        return weights.get_state_dict(map_location="cpu", progress=sys.stderr.isatty(), weights_only=True)
    except Exception as e:  # noqa: BLE001 - urllib, http and pickle errors alike become one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if present:
            raise HubWeightsError(f"{key}={spec}: {path} is not a readable checkpoint ({reason}); delete it or "
                                  f"replace it with {weights.url}") from None
        raise HubWeightsError(f"{key}={spec}: {weights!r} is not cached and the download failed ({reason}); "
                              f"fetch {weights.url} and place it at {path}") from None


def local_weights(spec: str, arch: str, key: str = "teacher.ckpt") -> str:
    """Where `spec`'s file is on this machine, present or not: the path itself, or the hub cache's file of
    torchvision's weights."""
    return cached_file(hub_weights(spec, arch, key=key)) if is_hub_spec(spec) else spec


def weights_path(spec: str, arch: str, key: str = "teacher.ckpt") -> str:
    """A local file for `spec` (`local_weights`), a torchvision weights file downloaded first when missing.
    The teacher cache hashes this file."""
    path = local_weights(spec, arch, key)
    if is_hub_spec(spec) and not os.path.isfile(path):
        hub_state_dict(spec, arch, key)
    return path
