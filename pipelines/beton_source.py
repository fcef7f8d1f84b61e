"""The split a run reads: the raw dataset, or for `pipeline.name=ffcv` the `.beton` file's sidecar.

An ffcv run reads only the `.beton` files, so their sidecars (class names in order, counts, and the digest
of the source recorded at conversion) are the dataset's identity: `data.root` may hold nothing but
`ffcv/train.beton` and `ffcv/val.beton` with their `.json` sidecars (or `pipeline.ffcv_dir` may point at
them). Where the raw split is present too, it is cross-checked against the sidecar (class names in order,
file count) before anything trains on it.
"""
from __future__ import annotations

import os
from typing import List, Optional

from pipelines.sources import DataError, cifar_classes_in, open_source


class BetonSource:
    """A converted split known from its sidecar: what the trainer and the teacher cache ask of a source
    (length, class names, normalisation, identity). It has no per-sample access: the ffcv loader reads
    the samples from the .beton itself."""

    def __init__(self, path: str, meta: dict):
        self.path, self.meta = path, meta
        self.classes: List[str] = list(meta["classes"])
        self.name = meta["dataset"]
        self.mean_std = tuple(tuple(v) for v in meta["mean_std"])
        self.digest: str = meta["source_sha256"]  # teacher_cache.dataset_digest of the converted source

    def __len__(self):
        return int(self.meta["num_samples"])


def raw_split_present(data_cfg, train: bool) -> bool:
    """Whether `data.root` holds the raw split (CIFAR pickles, the demo's npz, or root/train|val)."""
    root = data_cfg.root
    if not root or not os.path.isdir(root):
        return False
    if data_cfg.dataset in ("cifar10", "cifar100"):
        return cifar_classes_in(root) is not None
    if data_cfg.dataset == "demo":
        return os.path.isfile(os.path.join(root, "train.npz" if train else "test.npz"))
    return os.path.isdir(os.path.join(root, "train" if train else "val"))


def open_split(cfg, train: bool, train_classes: Optional[List[str]] = None):
    """The train (`data.subset` applied) or validation split of the configured dataset, as the backend
    reads it; `train_classes` (the training split's names) must match the validation split's."""
    if cfg.pipeline.name != "ffcv":
        src = open_source(cfg.data, train=train, train_classes=train_classes)
        return _subset(src, cfg) if train else src
    from pipelines.ffcv_backend import beton_paths, check_sidecar
    path = beton_paths(cfg)[0 if train else 1]
    split = "train" if train else "val"
    raw = (open_source(cfg.data, train=train, train_classes=train_classes)
           if raw_split_present(cfg.data, train) else None)
    meta = check_sidecar(path, cfg, raw, split)
    if "source_sha256" not in meta:
        if raw is not None:  # the raw split identifies the data as before
            return _subset(raw, cfg) if train else raw
        raise DataError(f"{path}.json: records no source digest (source_sha256), so without the raw {split} "
                        f"split in data.root '{cfg.data.root}' nothing identifies the data; reconvert with "
                        f"datasets_prep/prep_ffcv.py --overwrite, or put the raw split back")
    src = BetonSource(path, meta)
    if train_classes is not None and src.classes != list(train_classes):
        raise DataError(f"{path}: class names differ from the training split's ({len(src.classes)} vs "
                        f"{len(train_classes)} classes, or another order); convert both splits of one dataset")
    return src


def _subset(src, cfg):
    from pipelines import subset
    return subset(src, cfg.data.subset) if cfg.data.subset else src
