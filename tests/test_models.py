"""Model zoo: every forward, and state-dict keys/shapes of the CRD/mdistiller zoo's checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from training.checkpoint import load_model_weights
from training.models import CIFAR_MODELS, available_models, create_model


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_forward_shape(name):
    m = create_model(name, 100).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_cifar_models_take_64px_inputs(name):  # Tiny-ImageNet
    with torch.no_grad():
        assert create_model(name, 200).eval()(torch.randn(2, 3, 64, 64)).shape == (2, 200)


@pytest.mark.parametrize("name", [n for n in available_models() if n.startswith("imagenet_")])
def test_imagenet_forward_shape(name):
    with torch.no_grad():
        assert create_model(name, 1000).eval()(torch.randn(1, 3, 112, 112)).shape == (1, 1000)


def test_unknown_model_suggests_nearest():
    with pytest.raises(ValueError, match="did you mean 'resnet8x4'"):
        create_model("resnet8x5", 100)


def _bn(prefix):
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def expected_cifar_resnet(depth, widths, nc=100):
    """The zoo's resnet.py naming, written out independently of our implementation."""
    n = (depth - 2) // 6
    keys = {"conv1.weight": (widths[0], 3, 3, 3)}
    keys.update({k: None for k in _bn("bn1")})
    cin = widths[0]
    for li, w in enumerate(widths[1:], 1):
        for b in range(n):
            p = f"layer{li}.{b}"
            keys[f"{p}.conv1.weight"] = (w, cin if b == 0 else w, 3, 3)
            keys.update({k: None for k in _bn(f"{p}.bn1") + _bn(f"{p}.bn2")})
            keys[f"{p}.conv2.weight"] = (w, w, 3, 3)
            if b == 0 and (li > 1 or cin != w):
                keys[f"{p}.downsample.0.weight"] = (w, cin, 1, 1)
                keys.update({k: None for k in _bn(f"{p}.downsample.1")})
        cin = w
    keys["fc.weight"], keys["fc.bias"] = (nc, widths[3]), (nc,)
    return keys


def expected_wrn(depth, k, nc=100):
    n = (depth - 4) // 6
    ch = [16, 16 * k, 32 * k, 64 * k]
    keys = {"conv1.weight": (16, 3, 3, 3)}
    for bi in range(3):
        for i in range(n):
            cin, cout = (ch[bi] if i == 0 else ch[bi + 1]), ch[bi + 1]
            p = f"block{bi + 1}.layer.{i}"
            keys.update({kk: None for kk in _bn(f"{p}.bn1") + _bn(f"{p}.bn2")})
            keys[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                keys[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
    keys.update({kk: None for kk in _bn("bn1")})
    keys["fc.weight"], keys["fc.bias"] = (nc, ch[3]), (nc,)
    return keys


def expected_vgg13(nc=100):
    cfg = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]
    keys, cin = {}, 3
    for b, convs in enumerate(cfg):
        for j, v in enumerate(convs):
            keys[f"block{b}.{3 * j}.weight"] = (v, cin, 3, 3)
            keys[f"block{b}.{3 * j}.bias"] = (v,)
            keys.update({k: None for k in _bn(f"block{b}.{3 * j + 1}")})
            cin = v
    keys["classifier.weight"], keys["classifier.bias"] = (nc, 512), (nc,)
    return keys


def expected_resnetv2(blocks, nc=100):
    """The zoo's resnetv2.py naming (ResNet18 / ResNet34: BasicBlock; `shortcut` projections; `linear`), BN
    shapes included."""
    def bn(prefix, c):
        return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
            f"{prefix}.num_batches_tracked": ()}
    keys = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64)}
    cin = 64
    for li, (w, n) in enumerate(zip((64, 128, 256, 512), blocks), 1):
        for b in range(n):
            p = f"layer{li}.{b}"
            keys[f"{p}.conv1.weight"] = (w, cin if b == 0 else w, 3, 3)
            keys[f"{p}.conv2.weight"] = (w, w, 3, 3)
            keys.update(bn(f"{p}.bn1", w) | bn(f"{p}.bn2", w))
            if b == 0 and cin != w:
                keys[f"{p}.shortcut.0.weight"] = (w, cin, 1, 1)
                keys.update(bn(f"{p}.shortcut.1", w))
        cin = w
    keys["linear.weight"], keys["linear.bias"] = (nc, 512), (nc,)
    return keys


@pytest.mark.parametrize("name,expected,params_m", [
    ("ResNet18", expected_resnetv2((2, 2, 2, 2)), 11.22),
    ("ResNet34", expected_resnetv2((3, 4, 6, 3)), 21.33),
    ("resnet8x4", expected_cifar_resnet(8, [32, 64, 128, 256]), 1.23),
    ("resnet32x4", expected_cifar_resnet(32, [32, 64, 128, 256]), 7.43),
    ("resnet56", expected_cifar_resnet(56, [16, 16, 32, 64]), 0.86),
    ("wrn_40_2", expected_wrn(40, 2), 2.26),
    ("wrn_16_2", expected_wrn(16, 2), 0.70),
    ("vgg13", expected_vgg13(), 9.46),
])
def test_state_dict_matches_zoo(name, expected, params_m):
    m = create_model(name, 100)
    sd = m.state_dict()
    assert set(sd) == set(expected), (set(sd) ^ set(expected))
    for k, shape in expected.items():
        if shape is not None:
            assert tuple(sd[k].shape) == shape, k
    # Parameter counts as published in the CRD paper's tables (millions, 100 classes).
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == params_m


@pytest.mark.parametrize("name,params_m", [("MobileNetV2", 0.81), ("ShuffleV1", 0.95), ("ShuffleV2", 1.36),
                                           ("ResNet50", 23.71), ("vgg8", 3.97), ("resnet110", 1.74)])
def test_parameter_counts(name, params_m):
    m = create_model(name, 100)
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == params_m


def _zoo_resnetv2_forward(sd, x, blocks):
    """The zoo's resnetv2.py forward (BasicBlock), written out functionally over a state dict in eval mode."""
    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])
    out = F.relu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for li, n in enumerate(blocks, 1):
        for b in range(n):
            p, stride = f"layer{li}.{b}", 2 if b == 0 and li > 1 else 1
            y = F.relu(bn(F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            y = bn(F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = out
            if f"{p}.shortcut.0.weight" in sd:
                short = bn(F.conv2d(out, sd[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1")
            out = F.relu(y + short)
    return F.linear(F.adaptive_avg_pool2d(out, 1).reshape(out.size(0), -1), sd["linear.weight"], sd["linear.bias"])


def test_zoo_resnet18_checkpoint_strict_loads_and_computes_the_zoo_forward(tmp_path):
    """A checkpoint in the zoo's layout ({"model": sd}, keys of expected_resnetv2) loads strictly; the forward
    is the zoo's; its adaptive pool takes Tiny-ImageNet's 64 px and CRLD's 384 px ViT-teacher row."""
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.zeros(shape, dtype=torch.long) if k.endswith("num_batches_tracked") else
              torch.rand(shape, generator=g) + 0.5 if k.endswith("running_var") else
              torch.randn(shape, generator=g) * 0.1 + k.endswith(("bn1.weight", "bn2.weight", "shortcut.1.weight")))
          for k, shape in expected_resnetv2((2, 2, 2, 2), nc=200).items()}
    path = str(tmp_path / "ckpt_epoch_240.pth")
    torch.save({"model": sd, "epoch": 240}, path)
    m = create_model("ResNet18", 200)
    load_model_weights(m, path)
    m.eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _zoo_resnetv2_forward(sd, x, (2, 2, 2, 2)), rtol=1e-4, atol=1e-4)
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 200)
    with torch.device("meta"):
        assert create_model("ResNet18", 200)(torch.empty(2, 3, 384, 384)).shape == (2, 200)
