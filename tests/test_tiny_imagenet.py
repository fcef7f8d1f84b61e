"""`datasets_prep/tiny_imagenet.py`: the archive layout becomes an ImageFolder the loaders read; the paper's ViT row
starts on it."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from datasets_prep.tiny_imagenet import convert
from pipelines import build_loaders
from pipelines.sources import DataError
from training.config import load_config
from training.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WNIDS = ["n01443537", "n01629819", "n01641577"]


def make_archive(root, per_class=4, val=6):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "val", "images"))
    open(os.path.join(root, "wnids.txt"), "w").write("\n".join(WNIDS) + "\n")
    for w in WNIDS:
        os.makedirs(os.path.join(root, "train", w, "images"))
        open(os.path.join(root, "train", w, f"{w}_boxes.txt"), "w").write("")
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                os.path.join(root, "train", w, "images", f"{w}_{k}.JPEG"))
    lines = []
    for k in range(val):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            os.path.join(root, "val", "images", f"val_{k}.JPEG"))
        lines.append(f"val_{k}.JPEG\t{WNIDS[k % 3]}\t0\t0\t63\t63")
    open(os.path.join(root, "val", "val_annotations.txt"), "w").write("\n".join(lines) + "\n")
    return root


def cfg(root):
    return load_config(os.path.join(ROOT, "configs/tiny_imagenet/base.yaml"),
                       [f"data.root={root}", "data.num_classes=3", "pipeline.batch_size=4",
                        "pipeline.num_workers=0", "pipeline.name=torch"])


def test_archive_layout_converts_and_trains(tmp_path):
    src = make_archive(str(tmp_path / "tiny-imagenet-200"))
    with pytest.raises(DataError, match="archive's layout: convert it with"):
        build_loaders(cfg(src), torch.device("cpu"))
    out = str(tmp_path / "tiny")
    assert convert(src, out) == 3 * 4 + 6
    assert sorted(os.listdir(os.path.join(out, "val"))) == WNIDS
    assert sorted(os.listdir(os.path.join(out, "val", WNIDS[1]))) == ["val_1.JPEG", "val_4.JPEG"]
    train, val, source = build_loaders(cfg(out), torch.device("cpu"))
    assert source.classes == WNIDS and len(source) == 12
    assert next(iter(train)).weak.shape == (4, 3, 64, 64)
    assert sorted(torch.cat([b.target for b in val]).tolist()) == [0, 0, 1, 1, 2, 2]
    assert convert(src, out) == 0  # complete: a no-op


def test_bad_archives_are_one_line_errors_and_leave_nothing(tmp_path):
    src = make_archive(str(tmp_path / "a"))
    ann = os.path.join(src, "val", "val_annotations.txt")
    open(ann, "a").write("val_99.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:7: expected"):
        convert(src, str(tmp_path / "o"))
    open(ann, "w").write("val_99.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="val_99.JPEG: missing"):
        convert(src, str(tmp_path / "o"))
    os.remove(os.path.join(src, "wnids.txt"))
    with pytest.raises(DataError, match="wnids.txt: missing"):
        convert(src, str(tmp_path / "o"))
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_the_vit_teacher_row_starts_on_a_tiny_imagenet_tree(tmp_path):
    """The paper's ViT-L/16-at-384 -> ResNet18 config, at small sizes: timm's 160 px test ViT as the teacher (a
    `model_state_dict` file, the released code's layout), the 64 px images upsampled to 80 before the crop."""
    path = os.path.join(ROOT, "configs/tiny_imagenet/crld/vit_l384_resnet18.yaml")
    paper = load_config(path)
    assert (paper.teacher.name, paper.model.name) == ("timm:vit_large_patch16_384", "ResNet18")
    assert (paper.data.resize_source, paper.data.image_size, paper.data.crop_padding) == (384, 384, 8)
    assert (paper.pipeline.batch_size, paper.optim.epochs, paper.optim.lr, list(paper.optim.milestones)) == \
        (32, 100, 0.025, [30, 60, 90])
    m = paper.method
    assert (m.name, m.temperature, m.ce_weight, m.wv_weight, m.cv_weight, m.tau_w, m.tau_s) == \
        ("crld", 2.0, 1.0, 2.0, 0.5, 0.9, 0.2)
    out = str(tmp_path / "tiny")
    convert(make_archive(str(tmp_path / "tiny-imagenet-200")), out)
    torch.manual_seed(0)
    ckpt = tmp_path / "vit.pth"
    torch.save({"model_state_dict": create_model("timm:test_vit", 3).state_dict()}, ckpt)
    summary = train.main(["--config", path, f"teacher.ckpt={ckpt}", "teacher.name=timm:test_vit",
                          f"data.root={out}", "data.num_classes=3", "data.image_size=80", "data.resize_source=80",
                          "pipeline.batch_size=4", "pipeline.val_batch_size=6", "pipeline.num_workers=0",
                          "optim.epochs=1", "run.progress=false", f"run.out_dir={tmp_path / 'runs'}"])
    assert summary["epochs"] == 1 and np.isfinite(summary["best_top1"])
    assert "resize_source: 80" in open(tmp_path / "runs" / "vit_l384_resnet18" / "config.yaml").read()
