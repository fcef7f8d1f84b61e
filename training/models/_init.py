"""Weight initialisation shared by the CIFAR zoo (the zoo's own scheme)."""
import torch.nn as nn


def kaiming_init(model: nn.Module, linear_bias_zero: bool = False) -> None:
    """Conv: He-normal (fan_out, ReLU); BN: weight 1, bias 0; optionally Linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif linear_bias_zero and isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
