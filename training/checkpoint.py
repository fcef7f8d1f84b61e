"""Checkpoints: atomic writes, safe loading (`weights_only=True`), and lenient weight import.

`load_model_weights` accepts this project's checkpoints, `{"model": sd}` / `{"state_dict": sd}` /
`{"model_state_dict": sd}` files (the CRD / mdistiller teacher zoo, CRLD's ViT teacher, timm's and DeiT's
training checkpoints, whose `args` is an argparse Namespace), bare state dicts, `.safetensors` files,
`module.` / `_orig_mod.` prefixed keys (DataParallel / DDP / torch.compile, nested in any order), a wrapper's
prefix on every key (`model.`, `backbone.`, ...) where removing it fits the model exactly, and
torchvision's pretrained weights (`torchvision:IMAGENET1K_V1`).
"""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from typing import Dict

import torch

from common.errors import CheckpointError
from common.files import save_atomic
from training.hub_weights import hub_state_dict, is_hub_spec


def atomic_save(obj, path: str) -> None:
    """`torch.save` to `path` whole or not at all, on disk before it takes the name; a full disk is an
    `OutputError` (its tensors' bytes against the free space) and leaves the previous file in place."""
    save_atomic(path, lambda f: _torch_save(obj, f), fsync=True, need=lambda: _tensor_bytes(obj))


def _torch_save(obj, f) -> None:
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        # a failed write (a full disk) makes torch's zip writer fail again as it closes ("unexpected pos"),
        # which hides the OSError that says why
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in `obj` (nested dicts, lists, tuples): about a torch.save file's size."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _check_container(path: str) -> None:
    """A torch.save file is a zip archive (or, from old PyTorch, a pickle): anything else gets one short line
    here instead of torch's weights_only explanation."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (an interrupted copy or download?)")
    elif head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save archive nor a pickle)")


def safe_load(path: str, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True; `mmap`: tensors are mapped, not read (a look at the metadata)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    _check_container(path)
    try:
        # a Namespace holds only plain values; timm's and DeiT's train scripts store their arguments as one
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refused to load (weights_only=True: it contains objects "
                              f"beyond tensors and plain containers): {first}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def extract_state_dict(obj, path: str = "<checkpoint>") -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict found (expected a state dict or a dict with "
                              f"'model' or 'state_dict')")
    sd = dict(obj)
    stripped = True
    while stripped:  # DataParallel / DDP / torch.compile wrappers, possibly several
        stripped = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                              f"(pip install safetensors; timm brings it)") from None
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _without_wrapper_prefix(sd: dict, own: dict) -> dict:
    """`sd` with one leading `name.` removed from every key where the result fits `own`'s keys exactly (a
    Lightning module's `model.`, a wrapper's `backbone.`); else `sd` unchanged."""
    heads = {k.split(".", 1)[0] for k in sd}
    if len(heads) != 1 or not all("." in k for k in sd):
        return sd
    inner = {k.split(".", 1)[1]: v for k, v in sd.items()}
    return inner if set(inner) == set(own) else sd


def load_model_weights(model: torch.nn.Module, path: str, arch: str = "", key: str = "teacher.ckpt") -> None:
    """Strictly load weights into `model`, with a message listing what does not fit. `path` may also be
    `torchvision:<member>`: torchvision's weights for `arch` (`training/hub_weights.py`)."""
    if is_hub_spec(path):
        sd = hub_state_dict(path, arch, key)
    elif path.endswith(".safetensors"):
        sd = extract_state_dict(_read_safetensors(path), path)
    else:
        sd = extract_state_dict(safe_load(path), path)
    own = model.state_dict()
    sd = _without_wrapper_prefix(sd, own)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches, e.g. {'; '.join(mismatched[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:5])}")
        raise CheckpointError(f"{path}: does not fit {type(model).__name__} "
                              f"(wrong architecture or class count?): " + " | ".join(parts))
    model.load_state_dict(sd, strict=True)
