"""Model registry: `create_model(name, num_classes)` returns an `nn.Module` whose forward gives logits.

CIFAR names follow the CRD / mdistiller zoo exactly (resnet8x4, wrn_40_2, vgg13, MobileNetV2,
ShuffleV1, ShuffleV2, ResNet18, ResNet34, ResNet50, ...); ImageNet models carry an `imagenet_` prefix;
`timm:<arch>` is any timm architecture (`training/models/timm_models.py`).
"""
import difflib

import torch.nn as nn

from common.errors import UserError
from training.models import (cifar_mobilenetv2, cifar_resnet, cifar_resnetv2, cifar_shufflenet,
                             cifar_vgg, cifar_wrn, imagenet, timm_models)

_REGISTRY = {}
for _mod in (cifar_resnet, cifar_wrn, cifar_vgg, cifar_mobilenetv2, cifar_shufflenet, cifar_resnetv2,
             imagenet):
    _REGISTRY.update(_mod.MODELS)

CIFAR_MODELS = tuple(k for k in _REGISTRY if not k.startswith("imagenet_"))


def available_models():
    return tuple(_REGISTRY)


def name_problem(name: str):
    """Why `name` names no model (with the nearest name), or None."""
    if timm_models.is_timm(name):
        return timm_models.name_problem(name)
    if name in _REGISTRY:
        return None
    near = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"unknown model '{name}'{hint}; choose from {', '.join(_REGISTRY)} or timm:<arch>"


def input_size_problem(name: str, image_size: int):
    """Why model `name` cannot take `image_size` px square inputs, or None (the registry's own models pool
    adaptively and take any size their strides allow)."""
    return timm_models.input_size_problem(name, image_size) if timm_models.is_timm(name) else None


def create_model(name: str, num_classes: int) -> nn.Module:
    problem = name_problem(name)
    if problem:
        raise UserError(problem)
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if timm_models.is_timm(name):
        return timm_models.create(name, num_classes)
    return _REGISTRY[name](num_classes)
