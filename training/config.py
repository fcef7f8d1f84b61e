"""The typed config tree: defaults, YAML diffs, dotted CLI overrides, validation.

A run's config is `defaults <- YAML file (optionally chaining `_base_`) <- CLI overrides`.
Unknown keys, wrong types and impossible values raise `ConfigError` naming the key (and the
nearest valid name where one exists).
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `amp: off` stays the string 'off'."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_load(text):
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key at fault."""


@dataclass
class DataConfig:
    dataset: str = "cifar100"      # cifar10 | cifar100 | imagenet | tiny_imagenet | demo | imagefolder
    root: str = "data/cifar100"
    num_classes: int = 100
    image_size: int = 32           # side of both training views
    train_crop: str = "pad"        # pad: RandomCrop(size, padding) | rrc: RandomResizedCrop(size)
    crop_padding: int = 4
    val_resize: int = 0            # 0: no resize (CIFAR); else resize shorter side, centre-crop image_size
    subset: int = 0                # >0: first N training samples only (quick runs, tests)
    skip_bad_images: bool = False  # log and skip unreadable images instead of failing


@dataclass
class PipelineConfig:
    name: str = "torch"            # torch | dali | ffcv | gpu (arrays resident on the device)
    route: str = "auto"            # auto (device when training on CUDA) | host | device (the accelerator
                                   # route's code, also on a CPU: tests and measurements)
    batch_size: int = 64           # global batch (split over ranks under DDP)
    val_batch_size: int = 256
    num_workers: int = 2
    randaug_n: int = 2             # ops per strong view (the paper: 2)
    strong_aug: bool = True        # False: the strong view gets only crop + flip (ablation)
    drop_last: bool = True
    dali_device: str = "auto"      # dali: auto (GPU decode when CUDA is there) | cpu | gpu
    dali_threads: int = 0          # dali: DALI's CPU threads (0: one per core)
    host_threads: int = 0          # dali CPU mode, ffcv: threads cutting views on the host (0: one per core)
    prefetch: int = 2              # dali: batches in flight
    ffcv_dir: str = ""             # ffcv: folder with train.beton / val.beton (default: <data.root>/ffcv)
    ffcv_order: str = "random"     # ffcv: random | quasi_random (less RAM, for datasets beyond memory)
    os_cache: bool = True          # ffcv: read the .beton through the OS page cache


@dataclass
class ModelConfig:
    name: str = "resnet8x4"
    ckpt: str = ""                 # optional initial weights for the student


@dataclass
class TeacherConfig:
    name: str = "resnet32x4"
    ckpt: str = ""                 # required for kd / dkd / crld
    source: str = "online"         # online | cache (logits precomputed by cache_teacher.py)
    cache: str = ""                # teacher.source=cache: the cache directory
    cache_cycle: bool = False      # a cache of E epochs replays its epochs (views included) for longer runs


@dataclass
class MethodConfig:
    name: str = "crld"             # ce | kd | dkd | crld
    temperature: float = 4.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0         # kd: weight of the KD term
    wv_weight: float = 2.0         # crld: within-view weight
    cv_weight: float = 0.5         # crld: cross-view weight
    tau_w: float = 0.9
    tau_s: float = 0.2
    base: str = "kd"               # crld's pairwise term: kd | dkd
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 20           # epochs of linear warm-up of the DKD term
    logit_stand: bool = False      # z-score logits before the KD terms (Sun et al., CVPR 2024)
    joint_forward: bool = False    # student: one forward over both views (shared BN statistics)


@dataclass
class OptimConfig:
    name: str = "sgd"
    impl: str = "auto"             # auto (fused on CUDA, foreach else) | foreach | fused | apex
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    epochs: int = 240
    schedule: str = "step"         # step | cosine
    milestones: List[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0            # cosine floor
    lr_ref_batch: int = 0          # >0: linear scaling, lr * pipeline.batch_size (global) / lr_ref_batch


@dataclass
class RunConfig:
    name: str = ""                 # default: derived from the config file name
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    amp: str = "auto"              # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    channels_last: bool = True
    compile: bool = False          # torch.compile the student's training forward and the online teacher
    deterministic: bool = False
    log_every: int = 50            # steps between host syncs for the progress bar
    progress: bool = True
    save_every: int = 1            # epochs between `last.pt` checkpoints
    dist_timeout_s: int = 600      # DDP: a collective waiting longer (a dead or hung rank) is an error


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


DATASETS = ("cifar10", "cifar100", "imagenet", "tiny_imagenet", "demo", "imagefolder")
METHODS = ("ce", "kd", "dkd", "crld")


def _nearest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _keys(node, prefix=""):
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _keys(v, prefix + k + ".")
    return out


def _check_keys(diff: dict, where: str, schema: dict, prefix: str = ""):
    """Reject unknown keys with the nearest valid one, before OmegaConf's terser error."""
    for k, v in diff.items():
        if k == "_base_" and not prefix:
            continue
        if k not in schema:
            full = prefix + str(k)
            raise ConfigError(f"{where}: unknown config key '{full}'"
                              + _nearest(full, _keys(schema_root_cache)))
        if isinstance(schema[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: '{prefix}{k}' is a section; expected a mapping, got {v!r}")
            _check_keys(v, where, schema[k], prefix + k + ".")


schema_root_cache: dict = OmegaConf.to_container(OmegaConf.structured(Config))


def _read_yaml(path: str, seen=()) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: circular _base_ chain")
    try:
        with open(path) as f:
            diff = _yaml_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(diff, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    _check_keys(diff, path, schema_root_cache)
    base = diff.pop("_base_", None)
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        merged = OmegaConf.merge(OmegaConf.create(_read_yaml(base_path, seen + (path,))),
                                 OmegaConf.create(diff))
        return OmegaConf.to_container(merged)
    return diff


def _parse_override(item: str) -> tuple:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, value = item.split("=", 1)
    try:
        parsed = _yaml_load(value) if value != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override '{item}': value is not valid YAML") from None
    return key.strip(), parsed


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Build, merge and validate a config; returns an OmegaConf structured `Config`."""
    cfg = OmegaConf.structured(Config)
    layers = []
    if path:
        layers.append((path, _read_yaml(path)))
    for item in overrides or []:
        key, value = _parse_override(item)
        nested: dict = {}
        cur = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        layers.append((f"override '{item}'", nested))
    for where, diff in layers:
        _check_keys(diff, where, schema_root_cache)
        try:
            cfg = OmegaConf.merge(cfg, diff)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", "") or "?"
            msg = str(e).splitlines()[0]
            raise ConfigError(f"{where}: bad value for '{key}': {msg}") from None
    if path and not cfg.run.name:
        cfg.run.name = os.path.splitext(os.path.basename(path))[0]
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg) -> None:
    """Value checks OmegaConf's type system cannot express."""
    from training.models import available_models  # late: models import torch

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    def choice(key: str, value: str, options):
        need(value in options, key, f"unknown value '{value}'{_nearest(value, options)}; "
             f"choose from {', '.join(options)}")

    choice("data.dataset", cfg.data.dataset, DATASETS)
    choice("data.train_crop", cfg.data.train_crop, ("pad", "rrc"))
    need(cfg.data.num_classes >= 2, "data.num_classes", "must be >= 2")
    need(cfg.data.image_size >= 8, "data.image_size", "must be >= 8")
    need(cfg.data.crop_padding >= 0, "data.crop_padding", "must be >= 0")
    need(cfg.data.subset >= 0, "data.subset", "must be >= 0")
    from pipelines import available_pipelines
    choice("pipeline.name", cfg.pipeline.name, available_pipelines())
    need(cfg.pipeline.batch_size >= 1, "pipeline.batch_size", "must be >= 1")
    need(cfg.pipeline.val_batch_size >= 1, "pipeline.val_batch_size", "must be >= 1")
    need(cfg.pipeline.num_workers >= 0, "pipeline.num_workers", "must be >= 0")
    need(0 <= cfg.pipeline.randaug_n <= 8, "pipeline.randaug_n", "must be in [0, 8]")
    choice("pipeline.route", cfg.pipeline.route, ("auto", "host", "device"))
    choice("pipeline.dali_device", cfg.pipeline.dali_device, ("auto", "cpu", "gpu"))
    need(cfg.pipeline.dali_threads >= 0, "pipeline.dali_threads", "must be >= 0")
    need(cfg.pipeline.host_threads >= 0, "pipeline.host_threads", "must be >= 0")
    need(cfg.pipeline.prefetch >= 1, "pipeline.prefetch", "must be >= 1")
    choice("pipeline.ffcv_order", cfg.pipeline.ffcv_order, ("random", "quasi_random"))
    models = available_models()
    choice("model.name", cfg.model.name, models)
    choice("method.name", cfg.method.name, METHODS)
    if cfg.method.name != "ce":
        choice("teacher.name", cfg.teacher.name, models)
    choice("teacher.source", cfg.teacher.source, ("online", "cache"))
    need(cfg.teacher.source != "cache" or bool(cfg.teacher.cache), "teacher.cache",
         "teacher.source=cache needs teacher.cache=PATH (a directory made by cache_teacher.py)")
    m = cfg.method
    need(m.temperature > 0, "method.temperature", f"must be > 0, got {m.temperature}")
    for k in ("ce_weight", "kd_weight", "wv_weight", "cv_weight", "dkd_alpha", "dkd_beta"):
        need(getattr(m, k) >= 0, f"method.{k}", f"must be >= 0, got {getattr(m, k)}")
    need(0.0 <= m.tau_w <= 1.0, "method.tau_w", f"must be in [0, 1], got {m.tau_w}")
    need(0.0 <= m.tau_s <= 1.0, "method.tau_s", f"must be in [0, 1], got {m.tau_s}")
    choice("method.base", m.base, ("kd", "dkd"))
    need(m.dkd_warmup >= 0, "method.dkd_warmup", "must be >= 0")
    o = cfg.optim
    choice("optim.name", o.name, ("sgd",))
    choice("optim.impl", o.impl, ("auto", "foreach", "fused", "apex"))
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(not o.nesterov or o.momentum > 0, "optim.nesterov", "needs momentum > 0")
    need(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    choice("optim.schedule", o.schedule, ("step", "cosine"))
    need(list(o.milestones) == sorted(o.milestones) and all(x > 0 for x in o.milestones),
         "optim.milestones", f"must be increasing positive epochs, got {list(o.milestones)}")
    need(0 < o.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {o.gamma}")
    need(0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs", "must be in [0, epochs)")
    need(o.min_lr >= 0, "optim.min_lr", "must be >= 0")
    need(o.lr_ref_batch >= 0, "optim.lr_ref_batch", "must be >= 0 (0: no scaling)")
    r = cfg.run
    choice("run.amp", r.amp, ("auto", "off", "bf16", "fp16"))
    need(r.device in ("auto", "cpu", "cuda") or r.device.startswith("cuda:"), "run.device",
         f"unknown device '{r.device}'; use auto, cpu, cuda or cuda:N")
    need(r.log_every >= 1, "run.log_every", "must be >= 1")
    need(r.save_every >= 1, "run.save_every", "must be >= 1")
    need(r.dist_timeout_s >= 1, "run.dist_timeout_s", "must be >= 1")


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)
