"""timm architectures as `timm:<arch>` teachers and students: names, input sizes, the checkpoint layouts people
publish, the frozen teacher, a training run online and from the teacher cache. timm's tiny `test_*` models keep
it fast (test_vit: a ViT with a dynamic patch grid; vit_tiny_patch16_224: a fixed one)."""
import argparse
import collections
import json
import os

import numpy as np
import pytest
import torch

import cache_teacher
import train
from training.checkpoint import CheckpointError, load_model_weights
from training.cli import run_main
from training.config import ConfigError, load_config
from training.loop import frozen_teacher
from training.models import create_model

timm = pytest.importorskip("timm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vit():
    """timm:test_vit for 10 classes with non-trivial weights, and timm's own model holding the same ones."""
    torch.manual_seed(0)
    ours = create_model("timm:test_vit", 10).eval()
    ref = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _logits(m, x):
    with torch.no_grad():
        return m.eval()(x)


def test_created_like_timm_and_never_downloads(vit, monkeypatch):
    ours, ref = vit
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(ours, x), _logits(ref, x)) and _logits(ours, x).shape == (2, 10)
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    create_model("timm:test_resnet", 7)
    assert calls == [{"pretrained": False, "num_classes": 7}]


@pytest.mark.parametrize("name, match", [
    ("timm:vit_large_patch16_38", r"'teacher.name': unknown timm architecture 'vit_large_patch16_38' "
                                  r"\(did you mean 'timm:vit_large_patch16_384'\?\)"),
    ("timm:vit_tiny_patch16_224.augreg_in21k", r"did you mean 'timm:vit_tiny_patch16_224'"),
    ("timm:vit_tiny_patch16_224", r"'teacher.name': timm:vit_tiny_patch16_224 cannot take 32 px inputs .*"
                                  r"its default input size is 224x224 \(data.image_size=224\)"),
])
def test_bad_names_and_input_sizes_are_one_line_config_errors(name, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [f"teacher.name={name}"])
    assert "\n" not in str(e.value)


def test_input_size_is_checked_for_models_in_use_only():
    assert load_config(None, ["teacher.name=timm:vit_tiny_patch16_224", "data.image_size=224"])
    assert load_config(None, ["teacher.name=timm:vit_tiny_patch16_224", "method.name=ce"])  # no teacher
    assert load_config(None, ["model.name=timm:test_vit", "teacher.name=timm:test_resnet", "data.image_size=48"])
    with pytest.raises(ConfigError, match=r"timm:test_vit cannot take 40 px inputs \(Input height \(40\) should be "
                                          r"divisible by patch size \(16\)"):
        load_config(None, ["model.name=timm:test_vit", "data.image_size=40"])
    with pytest.raises(ConfigError, match="'model.name': timm:vit_tiny_patch16_224 cannot take 64 px"):
        load_config(None, ["model.name=timm:vit_tiny_patch16_224", "data.image_size=64"])


def test_cli_refuses_before_any_data_with_exit_2(tmp_path, capfd):
    rc = run_main(lambda: train.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"),
                                      f"data.root={tmp_path / 'absent'}", f"run.out_dir={tmp_path}",
                                      "teacher.name=timm:vit_tiny_patch16_224"]))
    err = capfd.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "cannot take 32 px inputs" in err, err


def _layouts(sd):
    module = collections.OrderedDict(("module." + k, v) for k, v in sd.items())
    return {"bare": sd, "model": {"model": sd, "epoch": 3},
            "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 99},  # CRLD's ViT
            "state_dict": {"state_dict": sd}, "module": module,
            "ddp_in_model": {"model": module},
            "compiled_ddp": {f"_orig_mod.{k}": v for k, v in module.items()},
            "timm_train": {"epoch": 1, "arch": "test_vit", "state_dict": module, "state_dict_ema": sd,
                           "args": argparse.Namespace(model="test_vit", lr=0.1, sched=None), "version": 2},
            "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}}}


@pytest.mark.parametrize("layout", ["bare", "model", "model_state_dict", "state_dict", "module", "ddp_in_model",
                                    "compiled_ddp", "timm_train", "lightning", "safetensors"])
def test_teacher_from_each_checkpoint_layout(vit, tmp_path, layout):
    ours, ref = vit
    sd = ours.state_dict()
    if layout == "safetensors":
        from safetensors.torch import save_file
        path = str(tmp_path / "model.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        path = str(tmp_path / "t.pth")
        torch.save(_layouts(sd)[layout], path)
    cfg = load_config(None, ["teacher.name=timm:test_vit", f"teacher.ckpt={path}", "data.num_classes=10",
                             "run.channels_last=true"])
    teacher = frozen_teacher(cfg, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_logits(teacher, x), _logits(ref, x), rtol=1e-5, atol=1e-5)


def test_wrong_keys_are_one_line_naming_the_first_missing_and_unexpected(vit, tmp_path):
    path = str(tmp_path / "t.pth")
    torch.save({"model": vit[0].state_dict()}, path)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(create_model("timm:test_resnet", 10), path)
    msg = str(e.value)
    assert "\n" not in msg and "missing keys, e.g. conv1.0.weight" in msg and "unexpected keys, e.g. cls_token" in msg
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \(10, 64\) vs model \(5, 64\)"):
        load_model_weights(create_model("timm:test_vit", 5), path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors file"):
        load_model_weights(vit[0], str(bad))


def test_train_online_and_from_cache_with_timm_teacher_and_students(demo_cut, tmp_path):
    """A timm ViT teacher online; the same teacher through cache_teacher.py into a group of a timm and a zoo
    student: one epoch each on 32 demo images, finite losses, the group's student 0 as its solo online run."""
    root = demo_cut(32, 16)
    torch.manual_seed(0)
    ckpt = str(tmp_path / "vit.pth")
    torch.save({"model_state_dict": create_model("timm:test_vit", 10).state_dict()}, ckpt)
    common = [f"data.root={root}", "pipeline.batch_size=16", "pipeline.val_batch_size=16", "pipeline.num_workers=0",
              "optim.epochs=1", "optim.warmup_epochs=0", "run.progress=false", "run.amp=off",
              "teacher.name=timm:test_vit", f"teacher.ckpt={ckpt}", "model.name=timm:test_efficientnet",
              "method.tau_w=0", "method.tau_s=0", f"run.out_dir={tmp_path}"]
    config = ["--config", os.path.join(ROOT, "configs/demo/crld.yaml")]
    online = train.main([*config, *common, "run.name=online"])
    cache = tmp_path / "cache"
    cache_teacher.main([*config, "--out", str(cache), "--epochs", "1", "--precision", "fp32", "--no-eval", *common])
    meta = json.load(open(cache / "meta.json"))
    assert meta["fingerprint"]["teacher"] == "timm:test_vit"
    group = train.main([*config, *common, "run.name=cached", "teacher.source=cache", f"teacher.cache={cache}",
                        "--student", "model.name=resnet8"])
    assert online["epochs"] == 1 and np.isfinite(online["best_top1"])
    lines = [json.loads(x) for x in open(tmp_path / "online" / "metrics.jsonl")]
    cached = [json.loads(x) for x in open(tmp_path / "cached" / "student0" / "metrics.jsonl")]
    assert np.isfinite(lines[0]["train_loss"]) and cached[0]["train_loss"] == pytest.approx(lines[0]["train_loss"],
                                                                                             rel=1e-4)
    assert [s["model"] for s in group] == ["timm:test_efficientnet", "resnet8"] and all(np.isfinite(s["best_top1"])
                                                                                  for s in group)
