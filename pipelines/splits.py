"""The split a run reads: the raw dataset, or for `pipeline.name=ffcv` the `.beton` file's sidecar.

An ffcv run reads only the `.beton` files, so their sidecars (class names in order, counts, and the digest
of the source recorded at conversion) are the dataset's identity: `data.root` may hold nothing but
`ffcv/train.beton` and `ffcv/val.beton` with their `.json` sidecars (or `pipeline.ffcv_dir` may point at
them). Where the raw split is present too, it is cross-checked against the sidecar (class names in order,
file count) before anything trains on it.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from pipelines.sources import DataError, cifar_classes_in, open_source, subset


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
    return subset(src, cfg.data.subset) if cfg.data.subset else src


def beton_paths(cfg):
    folder = cfg.pipeline.ffcv_dir or os.path.join(cfg.data.root, "ffcv")
    return os.path.join(folder, "train.beton"), os.path.join(folder, "val.beton")


def check_sidecar(path: str, cfg, source=None, split: str = "train") -> dict:
    """The .beton is complete and was converted from this dataset's `split` with these classes, in
    this order, and (given the raw `source`) from these files: its labels are indices into that list.
    A `BetonSource` is this sidecar itself: nothing to cross-check."""
    side = path + ".json"
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing .beton (create it with datasets_prep/prep_ffcv.py)")
    if not os.path.isfile(side):
        raise DataError(f"{side}: missing sidecar: the conversion did not finish; rerun prep_ffcv.py")
    try:
        with open(side) as f:
            meta = json.load(f)
        ds, n_cls, n, have_bytes = meta["dataset"], meta["num_classes"], meta["num_samples"], meta["beton_bytes"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{side}: unreadable sidecar ({type(e).__name__}: {e}); rerun prep_ffcv.py") from None
    if have_bytes != os.path.getsize(path):
        raise DataError(f"{path}: {os.path.getsize(path)} bytes but the sidecar recorded "
                        f"{have_bytes}: truncated or replaced; rerun prep_ffcv.py")
    if n_cls != cfg.data.num_classes:
        raise DataError(f"{path}: {n_cls} classes but data.num_classes={cfg.data.num_classes}")
    want = cfg.data.dataset
    if ds != want and not (ds == "imagefolder" and want in ("imagenet", "tiny_imagenet", "imagefolder")):
        raise DataError(f"{path}: converted from dataset '{ds}' but data.dataset={want}")
    got_split = (meta.get("settings") or {}).get("split")
    if (got_split == "train") != (split == "train"):
        raise DataError(f"{path}: converted from the '{got_split}' split but used as the {split} split")
    if source is not None and not isinstance(source, BetonSource):
        have, classes = meta.get("classes") or [], list(source.classes)
        if have != classes:
            k = next((k for k, (a, b) in enumerate(zip(have, classes)) if a != b), min(len(have), len(classes)))
            raise DataError(f"{path}: class names differ from {cfg.data.root}'s from position {k} ({have[k:k + 1]} "
                            f"vs {classes[k:k + 1]}; {len(have)} vs {len(classes)} classes): the labels would "
                            f"point at the wrong classes; rerun prep_ffcv.py")
        if n + meta.get("skipped_count", 0) != len(source) + len(getattr(source, "skipped", [])):
            raise DataError(f"{path}: holds {n} images (+{meta.get('skipped_count', 0)} skipped) but "
                            f"{cfg.data.root} has {len(source)}: converted from other files; rerun prep_ffcv.py")
    return meta
