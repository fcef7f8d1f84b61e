"""`torchvision:<member>` checkpoints: torchvision's weights API over a planted hub cache, never the network."""
import os
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import eval as eval_entry
from training.checkpoint import CheckpointError, load_model_weights
from training.cli import run_main
from training.config import ConfigError, load_config
from training.hub_weights import weights_path
from training.loop import frozen_teacher
from training.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty TORCH_HOME; a download attempt fails as it would offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def plant(hub, fc_bias_class=None):
    """A resnet18 state dict under the file name of the V1 weights' URL."""
    torch.manual_seed(0)
    sd = create_model("imagenet_resnet18", 1000).state_dict()
    if fc_bias_class is not None:  # every image then scores this class first
        sd["fc.weight"].zero_()
        sd["fc.bias"].zero_()[fc_bias_class] = 100.0
    hub.mkdir(parents=True, exist_ok=True)
    path = hub / os.path.basename(V1.url)
    torch.save(sd, path)
    return sd, str(path)


@pytest.mark.parametrize("member", ["IMAGENET1K_V1", "DEFAULT"])
def test_planted_weights_load_as_teacher(hub, member):
    sd, path = plant(hub)
    cfg = load_config(os.path.join(ROOT, "configs/imagenet/crld/r34_r18.yaml"),
                      ["teacher.name=imagenet_resnet18", f"teacher.ckpt=torchvision:{member}", "run.channels_last=false"])
    teacher = frozen_teacher(cfg, torch.device("cpu"))
    assert all(torch.equal(v, sd[k]) for k, v in teacher.state_dict().items())
    assert weights_path(cfg.teacher.ckpt, cfg.teacher.name) == path  # what the teacher cache hashes


def test_offline_without_the_file_names_the_url_and_the_path(hub):
    model = create_model("imagenet_resnet18", 1000)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(model, "torchvision:IMAGENET1K_V1", "imagenet_resnet18")
    msg = str(err.value)
    assert "\n" not in msg and V1.url in msg and str(hub / os.path.basename(V1.url)) in msg
    assert "no network in tests" in msg


def test_specs_are_checked_with_the_config(tmp_path):
    base = os.path.join(ROOT, "configs/imagenet/crld/r34_r18.yaml")
    cfg = load_config(base)  # the paper's teacher by default; checked without touching any file
    assert cfg.teacher.ckpt == "torchvision:IMAGENET1K_V1" and cfg.teacher.name == "imagenet_resnet34"
    assert load_config(os.path.join(ROOT, "configs/imagenet/crld/r50_mv1.yaml")).teacher.ckpt.startswith("torchvision:")
    with pytest.raises(ConfigError, match=r"teacher.ckpt=torchvision:IMAGENET1K_V9: ResNet34_Weights has no member "
                                          r"'IMAGENET1K_V9' \(did you mean 'IMAGENET1K_V1'\?\)"):
        load_config(base, ["teacher.ckpt=torchvision:IMAGENET1K_V9"])
    with pytest.raises(ConfigError, match="model 'imagenet_mobilenet_v1' has no torchvision weights"):
        load_config(base, ["model.ckpt=torchvision:DEFAULT", "model.name=imagenet_mobilenet_v1"])
    with pytest.raises(ConfigError, match="has 1000 classes but data.num_classes=100"):
        load_config(base, ["data.num_classes=100"])


def test_eval_takes_torchvision_weights(hub, tmp_path, capsys):
    plant(hub, fc_bias_class=7)
    rng = np.random.default_rng(0)
    for c in range(1000):  # a 1000-class validation split; only the first 20 classes hold an image (32x32)
        os.makedirs(tmp_path / "in" / "val" / f"n{c:08d}")
        if c < 20:
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "in" / "val" / f"n{c:08d}" / "a.png")
    m = eval_entry.main(["--model", "imagenet_resnet18", "--dataset", "imagenet", "--data", str(tmp_path / "in"),
                         "--ckpt", "torchvision:DEFAULT", "--pipeline", "torch", "data.image_size=32",
                         "data.val_resize=0", "pipeline.num_workers=0", "data.allow_empty_classes=true"])
    assert m["val_top1"] == pytest.approx(5.0)  # the planted head: class 7 for every image, 1 of 20 right
    os.remove(hub / os.path.basename(V1.url))
    rc = run_main(lambda: eval_entry.main(["--model", "imagenet_resnet18", "--dataset", "imagenet", "--data",
                                           str(tmp_path / "in"), "--ckpt", "torchvision:IMAGENET1K_V1"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and V1.url in err[0] and "--ckpt=torchvision:IMAGENET1K_V1" in err[0]
