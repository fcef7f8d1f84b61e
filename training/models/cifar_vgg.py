"""VGG with batch norm of the CRD / mdistiller zoo (vgg8, vgg11, vgg13, vgg16, vgg19: all `_bn`)."""
import torch.nn as nn
import torch.nn.functional as F

_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _make_layers(cfg, in_channels):
    layers = []
    for v in cfg:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v),
                   nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward


class VGG(nn.Module):
    def __init__(self, cfg, num_classes=100):
        super().__init__()
        ins = [3] + [c[-1] for c in cfg[:-1]]
        for i in range(5):
            setattr(self, f"block{i}", _make_layers(cfg[i], ins[i]))
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:  # the zoo pools once more for 64x64 inputs
            x = self.pool3(x)
        x = F.relu(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


MODELS = {name: (lambda c: lambda num_classes: VGG(c, num_classes))(c) for name, c in _CFG.items()}
