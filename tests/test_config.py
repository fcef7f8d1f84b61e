"""Config tree: YAML diffs, dotted overrides, and errors that name the key."""
import glob
import os

import pytest

from training.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_configs_are_found_in_every_folder():
    folders = {os.path.relpath(os.path.dirname(p), os.path.join(ROOT, "configs")).split(os.sep)[0] for p in CONFIGS}
    assert folders == {"cifar100", "imagenet", "tiny_imagenet", "demo"} and len(CONFIGS) >= 20, folders


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.run.name


def test_paper_cifar_setting():
    cfg = load_config(os.path.join(ROOT, "configs/cifar100/crld/res32x4_res8x4.yaml"))
    assert (cfg.model.name, cfg.teacher.name) == ("resnet8x4", "resnet32x4")
    assert (cfg.optim.lr, cfg.optim.epochs, list(cfg.optim.milestones)) == (0.05, 240, [150, 180, 210])
    assert (cfg.pipeline.batch_size, cfg.optim.weight_decay, cfg.optim.momentum) == (64, 5e-4, 0.9)
    m = cfg.method
    assert (m.name, m.temperature, m.ce_weight, m.wv_weight, m.cv_weight, m.tau_w, m.tau_s) == \
        ("crld", 4.0, 1.0, 2.0, 0.5, 0.9, 0.2)


def test_paper_imagenet_setting():
    cfg = load_config(os.path.join(ROOT, "configs/imagenet/crld/r34_r18.yaml"))
    assert (cfg.pipeline.batch_size, cfg.optim.epochs, cfg.optim.lr) == (512, 100, 0.2)
    assert (list(cfg.optim.milestones), cfg.optim.weight_decay) == ([30, 60, 90], 1e-4)
    assert (cfg.method.temperature, cfg.method.ce_weight) == (1.0, 2.0)


def test_mobilenet_students_use_lr_001():
    lrs = {}  # student -> learning rates of its configs
    for f in glob.glob(os.path.join(ROOT, "configs/cifar100/crld/*.yaml")):
        cfg = load_config(f)
        lrs.setdefault(cfg.model.name, set()).add(cfg.optim.lr)
    assert lrs.get("MobileNetV2") == {0.01} and lrs.get("ShuffleV2") == {0.01}, lrs
    assert lrs.get("ShuffleV1", {0.01}) == {0.01}, lrs


def test_overrides_apply_and_types_parse():
    cfg = load_config(None, ["optim.lr=0.1", "optim.milestones=[1,2]", "method.name=kd", "run.amp=off"])
    assert cfg.optim.lr == 0.1 and list(cfg.optim.milestones) == [1, 2] and cfg.method.name == "kd"


@pytest.mark.parametrize("override,pattern", [
    ("optim.lrr=0.1", r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"),
    ("metod.name=kd", r"unknown config key 'metod'.*did you mean 'method'"),
    ("optim.lr=abc", r"optim.lr"),
    ("optim.epochs=1.5", r"optim.epochs"),
    ("optim.lr=-0.1", r"'optim.lr': must be > 0"),
    ("method.tau_w=1.5", r"'method.tau_w': must be in \[0, 1\]"),
    ("method.tau_s=-0.1", r"'method.tau_s'"),
    ("model.name=resnet8x5", r"'model.name'.*did you mean 'resnet8x4'"),
    ("method.name=crdl", r"'method.name'.*did you mean 'crld'"),
    ("pipeline.name=dail", r"'pipeline.name'"),
    ("run.device=tpu", r"'run.device'"),
    ("optim.lr", r"section.key=value"),
    # enumerated values: the declared list, and the nearest of them
    ("run.amp=bf61", r"'run.amp': unknown value 'bf61' \(did you mean 'bf16'\?\); choose from auto, off, bf16, fp16"),
    ("optim.schedule=cosin", r"'optim.schedule'.*did you mean 'cosine'.*choose from step, cosine"),
    ("data.train_crop=rcc", r"'data.train_crop'.*did you mean 'rrc'"),
    ("method.base=dk", r"'method.base'.*choose from kd, dkd"),
    # bounds, open and closed
    ("pipeline.dali_prefetch=0", r"'pipeline.dali_prefetch': must be >= 1, got 0"),
    ("optim.momentum=1", r"'optim.momentum': must be in \[0, 1\), got 1"),
    ("optim.gamma=0", r"'optim.gamma': must be in \(0, 1\], got 0"),
    ("pipeline.randaug_n=9", r"'pipeline.randaug_n': must be in \[0, 8\], got 9"),
    # per-backend settings carry their backend's prefix
    ("pipeline.prefetch=2", r"unknown config key 'pipeline.prefetch'.*did you mean 'pipeline.dali_prefetch'"),
    ("pipeline.os_cache=false", r"unknown config key 'pipeline.os_cache'.*did you mean 'pipeline.ffcv_os_cache'"),
])
def test_bad_overrides_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"x.yaml: unknown config key 'optim.momentun'.*'optim.momentum'"):
        load_config(str(p))


def test_yaml_base_chain_and_missing_file(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.3}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\noptim: {epochs: 7}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.run.name) == (0.3, 7, "child")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
