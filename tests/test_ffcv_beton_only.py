"""`--pipeline ffcv` with only the .beton files: the sidecar is the dataset's identity; the raw split, when
present, is cross-checked against it."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("ffcv")

import cache_teacher  # noqa: E402
import eval as eval_entry  # noqa: E402
import train  # noqa: E402
from pipelines.splits import BetonSource, open_split  # noqa: E402
from pipelines.sources import DataError, demo_source  # noqa: E402
from training.config import load_config  # noqa: E402
from training.teacher_cache import dataset_digest  # noqa: E402


@pytest.fixture(scope="module")
def small_demo(demo_cut):
    """A 160 / 64-image demo set with both splits converted into root/ffcv/."""
    return demo_cut(160, 64, betons=True)


def beton_only(small_demo, tmp_path):
    """A data.root holding nothing but ffcv/{train,val}.beton and their sidecars."""
    root = tmp_path / "beton_only"
    shutil.copytree(os.path.join(small_demo, "ffcv"), root / "ffcv")
    return str(root)


def args(root, tmp_path, *over):
    return ["--config", "configs/demo/kd.yaml", "--pipeline", "ffcv", f"data.root={root}", f"run.out_dir={tmp_path}",
            "pipeline.batch_size=32", "pipeline.num_workers=1", "optim.epochs=1", "optim.warmup_epochs=0",
            "model.name=resnet8", "teacher.name=resnet8", *over]


def test_the_sidecar_identifies_the_data_with_or_without_the_raw_split(small_demo, tmp_path):
    cfg = load_config(None, ["data.dataset=demo", f"data.root={small_demo}", "data.num_classes=10",
                             "pipeline.name=ffcv"])
    with_raw = open_split(cfg, train=True)
    assert isinstance(with_raw, BetonSource) and len(with_raw) == 160
    assert dataset_digest(with_raw) == dataset_digest(demo_source(small_demo, True))  # a cache built either way fits
    alone = load_config(None, ["data.dataset=demo", f"data.root={beton_only(small_demo, tmp_path)}",
                               "data.num_classes=10", "pipeline.name=ffcv"])
    train_src = open_split(alone, train=True)
    assert dataset_digest(train_src) == dataset_digest(with_raw) and train_src.classes == with_raw.classes
    val_src = open_split(alone, train=False, train_classes=train_src.classes)
    assert isinstance(val_src, BetonSource) and len(val_src) == 64 \
        and val_src.mean_std == demo_source(small_demo, False).mean_std


def test_cache_train_and_eval_without_the_raw_split(small_demo, teacher_ckpt, tmp_path, capsys):
    root = beton_only(small_demo, tmp_path)
    cache = str(tmp_path / "cache")
    cache_teacher.main(["--config", "configs/demo/kd.yaml", "--pipeline", "ffcv", f"data.root={root}",
                        "teacher.name=resnet8", f"teacher.ckpt={teacher_ckpt}", "pipeline.num_workers=1",
                        "--epochs", "1", "--no-eval", "--out", cache])
    capsys.readouterr()
    s = train.main(args(root, tmp_path, "run.name=from_cache", "teacher.source=cache", f"teacher.cache={cache}",
                        f"teacher.ckpt={teacher_ckpt}", "run.progress=true"))
    assert s["epochs"] == 1 and np.isfinite(s["best_top1"])
    assert "\r" not in capsys.readouterr().err  # the progress bar, written to a pipe, is plain lines
    m = eval_entry.main(["--config", "configs/demo/kd.yaml", "--pipeline", "ffcv", "--ckpt",
                         str(tmp_path / "from_cache" / "best.pt"), f"data.root={root}", "pipeline.num_workers=1"])
    assert m["val_top1"] == pytest.approx(s["best_top1"])


def test_raw_split_present_is_still_cross_checked_and_a_sidecar_without_digest_needs_it(small_demo, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(small_demo, root)
    meta = json.load(open(root / "meta.json"))
    meta["classes"] = meta["classes"][::-1]  # raw data whose class order differs from the converted one
    json.dump(meta, open(root / "meta.json", "w"))
    cfg = load_config(None, ["data.dataset=demo", f"data.root={root}", "data.num_classes=10", "pipeline.name=ffcv"])
    with pytest.raises(DataError, match="class names differ"):
        open_split(cfg, train=True)
    alone = beton_only(small_demo, tmp_path)
    side = os.path.join(alone, "ffcv", "train.beton.json")
    meta = json.load(open(side))
    del meta["source_sha256"]
    json.dump(meta, open(side, "w"))
    cfg = load_config(None, ["data.dataset=demo", f"data.root={alone}", "data.num_classes=10", "pipeline.name=ffcv"])
    with pytest.raises(DataError, match=r"train.beton.json: records no source digest .*reconvert") as err:
        open_split(cfg, train=True)
    assert "\n" not in str(err.value)
