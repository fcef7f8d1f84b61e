"""`datasets_prep/imagenet_val.py`: the official flat validation split becomes class folders the loaders read."""
import hashlib
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_prep.imagenet_val import convert, main
from pipelines import build_loaders
from pipelines.sources import DataError
from training.config import load_config

WNIDS = ["n01440764", "n01443537", "n01484850"]
LABELS = [1, 0, 2, 1, 0, 2, 2]  # of val images 1..7, as indices into WNIDS


def flat_split(root, n=len(LABELS)):
    """A flat folder of ILSVRC2012_val_*.JPEG, the Kaggle label file and a train split with the classes."""
    rng = np.random.default_rng(0)
    images = os.path.join(root, "val_flat")
    os.makedirs(images)
    for i in range(1, n + 1):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            os.path.join(images, f"ILSVRC2012_val_{i:08d}.JPEG"))
    csv = os.path.join(root, "LOC_val_solution.csv")
    with open(csv, "w") as f:
        f.write("ImageId,PredictionString\n")
        for i, c in enumerate(LABELS, 1):
            f.write(f"ILSVRC2012_val_{i:08d},{WNIDS[c]} 1 2 30 40 {WNIDS[c]} 5 5 20 20 \n")
    for w in WNIDS:
        os.makedirs(os.path.join(root, "imagenet", "train", w))
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            os.path.join(root, "imagenet", "train", w, f"{w}_1.JPEG"))
    return images, csv


def test_flat_split_sorts_into_class_folders_and_trains(tmp_path):
    images, csv = flat_split(str(tmp_path))
    out = str(tmp_path / "imagenet" / "val")
    assert main(["--images", images, "--labels", csv, "--classes", str(tmp_path / "imagenet" / "train"),
                 "--out", out]) == len(LABELS)
    assert sorted(os.listdir(out)) == [".imagenet_val.json"] + WNIDS
    in_class = sorted(os.listdir(os.path.join(out, WNIDS[2])))
    assert in_class == ["ILSVRC2012_val_00000003.JPEG", "ILSVRC2012_val_00000006.JPEG", "ILSVRC2012_val_00000007.JPEG"]
    link = os.path.join(out, WNIDS[2], in_class[0])
    assert os.path.islink(link) and os.path.samefile(link, os.path.join(images, in_class[0]))
    cfg = load_config(None, ["data.dataset=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_classes=3",
                             "data.image_size=32", "data.val_resize=36", "data.train_crop=rrc", "pipeline.name=torch",
                             "pipeline.batch_size=3", "pipeline.num_workers=0", "method.name=ce"])
    _, val, _ = build_loaders(cfg, torch.device("cpu"))
    assert sorted(torch.cat([b.target for b in val]).tolist()) == sorted(LABELS)
    assert convert(images, out, labels=csv, classes=str(tmp_path / "imagenet" / "train")) == 0  # complete: a no-op
    with pytest.raises(DataError, match="holds a conversion of other inputs"):
        convert(images, out, labels=csv, copy=True)


def test_copies_and_the_devkit_ground_truth_through_torchvision(tmp_path, monkeypatch):
    """The devkit archive (meta.mat + ground truth) read by torchvision's own parser, md5 check included."""
    import scipy.io as sio
    from torchvision.datasets import imagenet as tv
    images, _ = flat_split(str(tmp_path))
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i + 1, w, f"class {i}", "", 0, np.zeros(0, np.uint8), 0, 1) for i, w in enumerate(WNIDS)]
    rows.append((1001, "n00001740", "entity", "", 3, np.array([1, 2, 3], np.uint8), 1, 0))  # not a leaf: no class
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    sio.savemat(data / "meta.mat", {"synsets": np.array(rows, dtype=[(f, "O") for f in fields]).reshape(-1, 1)})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{c + 1}\n" for c in LABELS))
    archive = str(tmp_path / "ILSVRC2012_devkit_t12.tar.gz")
    with tarfile.open(archive, "w:gz") as t:
        t.add(data.parent, arcname="ILSVRC2012_devkit_t12")
    with pytest.raises(DataError, match="not a readable ILSVRC2012 devkit"):  # md5 differs from the real one
        convert(images, str(tmp_path / "v0"), devkit=archive)
    md5 = hashlib.md5(open(archive, "rb").read()).hexdigest()
    monkeypatch.setitem(tv.ARCHIVE_META, "devkit", (tv.ARCHIVE_META["devkit"][0], md5))
    out = str(tmp_path / "val")
    assert convert(images, out, devkit=archive, copy=True) == len(LABELS)
    first = os.path.join(out, WNIDS[1], "ILSVRC2012_val_00000001.JPEG")
    assert not os.path.islink(first) and open(first, "rb").read() == open(
        os.path.join(images, "ILSVRC2012_val_00000001.JPEG"), "rb").read()
    assert sorted(os.listdir(tmp_path)) == sorted(["val_flat", "LOC_val_solution.csv", "imagenet", "val",
                                                   "ILSVRC2012_devkit_t12", "ILSVRC2012_devkit_t12.tar.gz"])


@pytest.mark.parametrize("case", ["no_label", "no_image", "unknown_wnid", "not_a_wnid"])
def test_bad_labels_are_one_line_errors_naming_them_and_leave_nothing(tmp_path, case):
    images, csv = flat_split(str(tmp_path))
    classes = None
    if case == "no_label":
        lines = open(csv).read().splitlines()
        open(csv, "w").write("\n".join(lines[:3] + lines[4:]) + "\n")  # drops image 3
        match = r"ILSVRC2012_val_00000003.JPEG: no label for this image in .*LOC_val_solution.csv"
    elif case == "no_image":
        os.remove(os.path.join(images, "ILSVRC2012_val_00000005.JPEG"))
        match = r"LOC_val_solution.csv:6: ILSVRC2012_val_00000005 has no image"
    elif case == "unknown_wnid":
        classes = str(tmp_path / "synsets.txt")
        open(classes, "w").write("".join(f"{w} some words\n" for w in WNIDS[:2]))
        match = r"LOC_val_solution.csv:4: unknown class 'n01484850' for ILSVRC2012_val_00000003 \(not among the 2"
    else:
        lines = open(csv).read().splitlines()
        open(csv, "w").write("\n".join(lines[:2] + ["ILSVRC2012_val_00000002,dog 1 1 2 2"] + lines[3:]) + "\n")
        match = r"LOC_val_solution.csv:3: unknown class 'dog' for ILSVRC2012_val_00000002 \(not a wnid"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError, match=match) as err:
        convert(images, str(tmp_path / "val"), labels=csv, classes=classes)
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == before
