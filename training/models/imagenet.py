"""ImageNet models: torchvision's ResNets and MobileNetV2, plus the MobileNetV1 of the mdistiller
ImageNet zoo. All carry the `imagenet_` prefix so they never clash with the CIFAR zoo's names
(`ResNet50` there is a different, 32x32 network)."""
import torch.nn as nn


def _conv_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


def _conv_dw(inp, oup, stride):
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
        cfg += [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
        self.model = nn.Sequential(_conv_bn(3, 32, 2), *[_conv_dw(i, o, s) for i, o, s in cfg],
                                   nn.AdaptiveAvgPool2d(1))  # == AvgPool2d(7) at 224x224
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc(self.model(x).flatten(1))


# our name -> torchvision's (its builder, and the weights enum `torchvision:<member>` checkpoints come from)
TORCHVISION_NAMES = {"imagenet_resnet18": "resnet18", "imagenet_resnet34": "resnet34",
                     "imagenet_resnet50": "resnet50", "imagenet_mobilenet_v2": "mobilenet_v2"}


def _torchvision(name):
    def build(num_classes):
        # imported here, not at module level: torchvision pulls in torch._dynamo (~1.7 s per fresh process),
        # and every `import train` (each CLI start, each spawned test process) imports this registry
        import torchvision
        return torchvision.models.get_model(name, num_classes=num_classes)
    return build


MODELS = {ours: _torchvision(theirs) for ours, theirs in TORCHVISION_NAMES.items()}
MODELS["imagenet_mobilenet_v1"] = lambda num_classes: MobileNetV1(num_classes=num_classes)
