"""The typed config tree: defaults, YAML diffs, dotted CLI overrides, validation.

A run's config is `defaults <- YAML file (optionally chaining `_base_`) <- CLI overrides`.
Unknown keys, wrong types and impossible values raise `ConfigError` naming the key (and the
nearest valid name where one exists). A group run (several students from one data pass, `load_group`)
adds for each further student `<- its own overrides` (the file's `students:` list, then `--student`),
which may change only what a student owns: model.*, method.* and optim.* except optim.epochs.
"""
from __future__ import annotations

import difflib
import os
import re
import shlex
from dataclasses import dataclass, field, fields
from typing import List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common import flat_items
from common.errors import UserError
from common.precision import AMP_SETTINGS
from pipelines import available_pipelines
from pipelines.randaugment_graph import PROGRAMS as STRONG_PROGRAMS
from training.hub_weights import HubWeightsError, hub_weights, is_hub_spec
from training.losses import distillation_term
from training.models import input_size_problem, name_problem as model_name_problem


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `amp: off` stays the string 'off'."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_load(text):
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(UserError):
    """A user-facing configuration problem; the message names the key at fault."""


def one_of(default: str, options):
    """A setting with enumerated values, declared once: validation and the error's nearest valid name both
    read `options` (a tuple, or a function returning one for registries: models, pipelines)."""
    return field(default=default, metadata={"one_of": options})


def model_name(default: str):
    """A model: a registry name or `timm:<arch>` (training/models); the error names the nearest one."""
    return field(default=default, metadata={"model_name": True})


def within(default, low=None, high=None, *, open_low=False, open_high=False):
    """A numeric setting in [low, high] (None: unbounded on that side; open_*: that end excluded)."""
    return field(default=default, metadata={"within": (low, high, open_low, open_high)})


@dataclass
class DataConfig:
    dataset: str = one_of("cifar100", ("cifar10", "cifar100", "imagenet", "tiny_imagenet", "demo", "imagefolder"))
    root: str = "data/cifar100"
    num_classes: int = within(100, 2)
    image_size: int = within(32, 8)  # side of both training views
    train_crop: str = one_of("pad", ("pad", "rrc"))  # RandomCrop(size, padding) | RandomResizedCrop(size)
    crop_padding: int = within(4, 0)
    val_resize: int = 0            # 0: no resize (CIFAR); else resize shorter side, centre-crop image_size
    # >0: every source image first resized as Resize(S, BICUBIC) (shorter side S), training views cut from
    # it and validation its centre image_size square (the paper's Tiny-ImageNet row at 384: pipelines/upsample.py)
    resize_source: int = within(0, 0)
    subset: int = within(0, 0)     # >0: an evenly strided N-sample training subset (quick runs, tests)
    skip_bad_images: bool = False  # log and skip unreadable images instead of failing
    allow_empty_classes: bool = False  # imagefolder: train although a class folder holds no image


@dataclass
class PipelineConfig:
    name: str = one_of("torch", available_pipelines)
    # auto: the accelerator route when training on CUDA; device: that route's code also on a CPU (tests,
    # measurements); host: per-sample work on host threads
    route: str = one_of("auto", ("auto", "host", "device"))
    batch_size: int = within(64, 1)  # global batch (split over ranks under DDP)
    val_batch_size: int = within(256, 1)
    num_workers: str = "auto"      # loader workers: auto (their share of run.cpus, common.cpus) or a number
    randaug_n: int = within(2, 0, 8)  # ops per strong view (the paper: 2)
    strong_aug: bool = True        # False: the strong view gets only crop + flip (ablation)
    # accelerator route's strong view: segmented (host-planned, per-op slices) or graph (a static-shape
    # program, compiled and replayed as a CUDA graph on CUDA): the same pixels (pipelines/randaugment_graph.py)
    strong_program: str = one_of("segmented", STRONG_PROGRAMS)
    drop_last: bool = True
    host_threads: int = within(0, 0)  # dali CPU mode, ffcv: threads cutting views on the host (0: their share)
    # dali
    dali_threads: int = within(0, 0)  # DALI's CPU threads (0: their share of run.cpus)
    dali_prefetch: int = within(2, 1)  # batches in flight
    dali_size_cache: bool = True   # keep the image-size table on disk (<root>/.crld_sizes.npz or ~/.cache/crld)
    # ffcv
    ffcv_dir: str = ""             # folder with train.beton / val.beton (default: <data.root>/ffcv)
    ffcv_order: str = one_of("random", ("random", "quasi_random"))  # quasi_random: less RAM, beyond-memory data
    ffcv_os_cache: bool = True     # read the .beton through the OS page cache


@dataclass
class ModelConfig:
    name: str = model_name("resnet8x4")
    ckpt: str = ""                 # optional initial weights for the student
    init_seed: Optional[int] = None  # seed of the weight initialisation (None: run.seed)


@dataclass
class TeacherConfig:
    name: str = model_name("resnet32x4")
    ckpt: str = ""                 # required for kd / dkd / crld
    source: str = one_of("online", ("online", "cache"))  # cache: logits precomputed by cache_teacher.py
    cache: str = ""                # teacher.source=cache: the cache directory
    cache_cycle: bool = False      # a cache of E epochs replays its epochs (views included) for longer runs


@dataclass
class MethodConfig:
    name: str = one_of("crld", ("ce", "kd", "dkd", "nkd", "normkd", "mlkd", "crld"))
    temperature: float = within(4.0, 0, open_low=True)  # kd, dkd, crld; mlkd's first temperature
    ce_weight: float = within(1.0, 0)
    kd_weight: float = within(1.0, 0)  # kd, nkd, normkd, mlkd: weight of the distillation term(s)
    wv_weight: float = within(2.0, 0)  # crld: within-view weight
    cv_weight: float = within(0.5, 0)  # crld: cross-view weight
    tau_w: float = within(0.9, 0, 1)
    tau_s: float = within(0.2, 0, 1)
    base: str = one_of("kd", ("kd", "dkd", "nkd", "normkd"))  # crld's pairwise term (mlkd: refused in validate)
    dkd_alpha: float = within(1.0, 0)
    dkd_beta: float = within(8.0, 0)
    dkd_warmup: int = within(20, 0)  # epochs of linear warm-up of the DKD term
    nkd_temperature: float = within(1.0, 0, open_low=True)  # nkd: temperature of the non-target term
    nkd_gamma: float = within(1.5, 0)  # nkd: weight of the non-target term
    normkd_t_norm: float = within(2.0, 0, open_low=True)  # normkd: a row's temperature is t_norm x its logits' std
    # mlkd: the prediction-augmentation temperatures besides method.temperature
    mlkd_temperatures: List[float] = field(default_factory=lambda: [3.0, 5.0, 2.0, 6.0])
    logit_stand: bool = False      # z-score logits before the KD terms (Sun et al., CVPR 2024); kd, dkd, crld
    joint_forward: bool = False    # student: one forward over both views (shared BN statistics)


@dataclass
class OptimConfig:
    name: str = one_of("sgd", ("sgd",))
    impl: str = one_of("auto", ("auto", "foreach", "fused", "apex"))  # auto: fused on CUDA, foreach else
    lr: float = within(0.05, 0, open_low=True)
    momentum: float = within(0.9, 0, 1, open_high=True)
    weight_decay: float = within(5e-4, 0)
    nesterov: bool = False
    epochs: int = within(240, 1)
    schedule: str = one_of("step", ("step", "cosine"))
    milestones: List[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = within(0.1, 0, 1, open_low=True)
    warmup_epochs: float = 0.0
    min_lr: float = within(0.0, 0)  # cosine floor
    lr_ref_batch: int = within(0, 0)  # >0: linear scaling, lr * pipeline.batch_size (global) / lr_ref_batch


@dataclass
class RunConfig:
    name: str = ""                 # default: derived from the config file name
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    amp: str = one_of("auto", AMP_SETTINGS)  # auto: bf16 on CUDA, off on CPU
    channels_last: bool = True
    compile: bool = False          # torch.compile the student's training forward and the online teacher
    deterministic: bool = False
    log_every: int = within(50, 1)  # steps between host syncs for the progress bar
    progress: bool = True
    save_every: int = within(1, 1)  # epochs between `last.pt` checkpoints
    save_every_min: float = within(10.0, 0)  # also mid-epoch, this often (minutes; 0: epoch ends only)
    tensorboard: bool = False      # also write metrics.jsonl's scalars as TensorBoard events (RUN_DIR/tensorboard)
    dist_timeout_s: int = within(600, 1)  # DDP: a collective waiting longer (a dead or hung rank) is an error
    cpus: int = within(0, 0)       # CPUs each rank keeps busy, loader and step together; 0: measured (common.cpus)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


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
        if k in ("_base_", "students") and not prefix:
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


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    return out


def _merge(layers, name_from: Optional[str]):
    cfg = OmegaConf.structured(Config)
    for where, diff in layers:
        _check_keys(diff, where, schema_root_cache)
        try:
            cfg = OmegaConf.merge(cfg, diff)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", "") or "?"
            msg = str(e).splitlines()[0]
            raise ConfigError(f"{where}: bad value for '{key}': {msg}") from None
    if name_from and not cfg.run.name:
        cfg.run.name = os.path.splitext(os.path.basename(name_from))[0]
    if cfg.model.init_seed is None:
        cfg.model.init_seed = cfg.run.seed
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _base_layers(path, overrides):
    """(layers of the base config, the file's `students:` list)."""
    layers, students = [], []
    if path:
        diff = _read_yaml(path)
        students = diff.pop("students", None) or []
        if not isinstance(students, list) or not all(isinstance(s, dict) for s in students):
            raise ConfigError(f"{path}: 'students' must be a list of override mappings, e.g. "
                              f"[{{model.name: resnet14}}, {{method.name: kd}}]")
        layers.append((path, diff))
    layers += [(f"override '{item}'", _nest(dict([_parse_override(item)]))) for item in overrides or []]
    return layers, students


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Build, merge and validate a config; returns an OmegaConf structured `Config`. For a group file this
    is its student 0 (what the group shares is the same for every student)."""
    return _merge(_base_layers(path, overrides)[0], path)


# What a student of a group may set for itself; the rest (data, pipeline and so the views, the data order's
# seed, teacher, batch size, epochs, device, AMP) is one per group.
STUDENT_KEYS = ("model.", "method.", "optim.")
SHARED_STUDENT_KEYS = ("optim.epochs",)


def load_group(path: Optional[str] = None, overrides: Optional[List[str]] = None, students=()) -> list:
    """The configs of a run's students: student 0 is the base (`load_config`), then one per entry of the
    file's `students:` list (override mappings) and one per `students` string (dotted overrides separated by
    spaces, as on the command line). A group's students share run.name's folder, each in student<k>/; a
    student's own config names the folder a solo run of it would write (`<run.name>-student<k>`)."""
    layers, in_file = _base_layers(path, overrides)
    extra = [(f"{path}: students[{i}]", dict(flat_items(d))) for i, d in enumerate(in_file)]
    for i, text in enumerate(students):
        try:
            items = shlex.split(text)
        except ValueError as e:
            raise ConfigError(f"--student '{text}': {e}") from None
        extra.append((f"--student '{text}'", dict(_parse_override(item) for item in items)))
    base = _merge(layers, path)
    group = [base]
    for k, (where, flat) in enumerate(extra, start=1):
        for key in flat:
            if not key.startswith(STUDENT_KEYS) or key in SHARED_STUDENT_KEYS:
                raise ConfigError(f"{where}: '{key}' is shared by the group and may not differ per student "
                                  f"(a student sets model.*, method.*, optim.* except optim.epochs)")
        name = {"run": {"name": f"{base.run.name or 'group'}-student{k}"}}
        group.append(_merge(layers + [(where, _nest(flat)), ("group", name)], path))
    return group
def _declared_problem(value, meta) -> Optional[str]:
    """What is wrong with `value` against its field's declaration (`one_of` / `within` / `model_name`), or None."""
    if "model_name" in meta:
        return model_name_problem(value)
    if "one_of" in meta:
        options = meta["one_of"]() if callable(meta["one_of"]) else meta["one_of"]
        if value not in options:
            return f"unknown value '{value}'{_nearest(value, options)}; choose from {', '.join(options)}"
    if "within" in meta:
        low, high, open_low, open_high = meta["within"]
        too_low = low is not None and (value <= low if open_low else value < low)
        too_high = high is not None and (value >= high if open_high else value > high)
        if too_low or too_high:
            if high is None:
                return f"must be {'>' if open_low else '>='} {low}, got {value}"
            return f"must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}, got {value}"
    return None


def validate(cfg) -> None:
    """Each field against its declaration, then the rules that tie fields together."""
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    # before the declared values, so that base=mlkd hears why rather than only the valid choices
    need(cfg.method.base != "mlkd", "method.base", "mlkd cannot be CRLD's pairwise term: its class- and "
         "batch-correlation terms compare whole-batch Gram matrices and have no per-sample value to gate; "
         "use kd, dkd, nkd or normkd")
    for section in fields(Config):
        for f in fields(section.default_factory()):
            problem = _declared_problem(getattr(cfg[section.name], f.name), f.metadata)
            need(problem is None, f"{section.name}.{f.name}", problem)
    _check_method(cfg.method, need)
    need(cfg.pipeline.num_workers == "auto" or cfg.pipeline.num_workers.isdigit(), "pipeline.num_workers",
         f"must be auto or a number >= 0, got '{cfg.pipeline.num_workers}'")
    d = cfg.data
    need(d.resize_source == 0 or d.resize_source >= d.image_size, "data.resize_source",
         f"must be 0 or >= data.image_size ({d.image_size}): views are cut from the resized image, "
         f"got {d.resize_source}")
    need(d.resize_source == 0 or d.val_resize == 0, "data.val_resize",
         "must be 0 with data.resize_source (validation is the resized image's centre crop)")
    need(cfg.teacher.source != "cache" or bool(cfg.teacher.cache), "teacher.cache",
         "teacher.source=cache needs teacher.cache=PATH (a directory made by cache_teacher.py)")
    _check_hub_specs(cfg)
    for key in ("model.name",) + (("teacher.name",) if cfg.method.name != "ce" else ()):
        problem = input_size_problem(OmegaConf.select(cfg, key), cfg.data.image_size)
        need(problem is None, key, problem)
    o = cfg.optim
    need(not o.nesterov or o.momentum > 0, "optim.nesterov", "needs momentum > 0")
    need(list(o.milestones) == sorted(o.milestones) and all(x > 0 for x in o.milestones),
         "optim.milestones", f"must be increasing positive epochs, got {list(o.milestones)}")
    need(0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs", "must be in [0, epochs)")
    r = cfg.run
    need(r.device in ("auto", "cpu", "cuda") or r.device.startswith("cuda:"), "run.device",
         f"unknown device '{r.device}'; use auto, cpu, cuda or cuda:N")


def _check_method(m, need) -> None:
    """Combinations of method settings that the methods do not define."""
    need(all(t > 0 for t in m.mlkd_temperatures), "method.mlkd_temperatures",
         f"temperatures must be > 0, got {list(m.mlkd_temperatures)}")
    uses = distillation_term(m)
    # the released NKD / NormKD / MLKD code standardises nothing, and NormKD already divides by each row's std
    need(not m.logit_stand or uses not in ("nkd", "normkd", "mlkd"), "method.logit_stand",
         f"not defined for {'method.base' if m.name == 'crld' else 'method.name'}={uses} (the released code "
         f"has no logit standardisation for it); set method.logit_stand=false")


def _check_hub_specs(cfg) -> None:
    """`torchvision:<member>` checkpoints name a real weights member of the architecture, with the
    configured class count; checked here, before any data is read or any file is fetched."""
    wanted = [("model.ckpt", cfg.model.ckpt, cfg.model.name)]
    if cfg.method.name != "ce":
        wanted.append(("teacher.ckpt", cfg.teacher.ckpt, cfg.teacher.name))
    for key, spec, arch in wanted:
        if is_hub_spec(spec):
            try:
                hub_weights(spec, arch, cfg.data.num_classes, key)
            except HubWeightsError as e:
                raise ConfigError(str(e)) from None


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)
