"""Model registry: `create_model(name, num_classes)` returns an `nn.Module` whose forward gives logits.

CIFAR names follow the CRD / mdistiller zoo exactly (resnet8x4, wrn_40_2, vgg13, MobileNetV2,
ShuffleV1, ShuffleV2, ResNet50, ...); ImageNet models carry an `imagenet_` prefix.
"""
import difflib

import torch.nn as nn

from pipelines.errors import UserError
from training.models import (cifar_mobilenetv2, cifar_resnet, cifar_resnet50, cifar_shufflenet,
                             cifar_vgg, cifar_wrn, imagenet)

_REGISTRY = {}
for _mod in (cifar_resnet, cifar_wrn, cifar_vgg, cifar_mobilenetv2, cifar_shufflenet, cifar_resnet50,
             imagenet):
    _REGISTRY.update(_mod.MODELS)

CIFAR_MODELS = tuple(k for k in _REGISTRY if not k.startswith("imagenet_"))


def available_models():
    return tuple(_REGISTRY)


def create_model(name: str, num_classes: int) -> nn.Module:
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise UserError(f"unknown model '{name}'{hint}; available: {', '.join(_REGISTRY)}")
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    return _REGISTRY[name](num_classes)
