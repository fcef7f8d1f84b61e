"""The `ffcv` backend: same batches as the reference, one decode per sample, sidecar checks."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("ffcv")

from datasets_prep.make_jpeg_folder import make_jpeg_folder  # noqa: E402
from datasets_prep.prep_ffcv import main as prep  # noqa: E402
from pipelines import build_loaders  # noqa: E402
from pipelines.sources import DataError  # noqa: E402
from training.config import load_config  # noqa: E402

CPU = torch.device("cpu")


def cfg_for(demo_root, folder, pipe, *over):
    return load_config(None, ["data.dataset=demo", f"data.root={demo_root}", "data.num_classes=10",
                              f"pipeline.ffcv_dir={folder}", "pipeline.batch_size=32", "pipeline.num_workers=1",
                              f"pipeline.name={pipe}", *over])


def test_views_equal_the_reference_backend(demo_root, demo_betons, first_batches):
    ffcv_b, ffcv_val = first_batches(cfg_for(demo_root, demo_betons, "ffcv"), 2, epoch=2)
    from pipelines.device import Normalizer
    from pipelines.sources import demo_source
    from pipelines.torch_backend import TwoViewDataset
    cfg = cfg_for(demo_root, demo_betons, "torch")
    src = demo_source(demo_root, True)
    ds, norm = TwoViewDataset(src, cfg.data, cfg.pipeline, cfg.run.seed), Normalizer(src.mean_std, "cpu")
    for b in ffcv_b:
        assert b.weak.shape == b.strong.shape == (32, 3, 32, 32) and b.weak.dtype == torch.float32
        assert b.weak.is_contiguous(memory_format=torch.channels_last)
        for j in range(0, 32, 5):
            w, s, y, _ = ds[(2, int(b.index[j]))]
            assert int(b.target[j]) == y
            assert torch.equal(norm(torch.from_numpy(np.array(w))[None])[0], b.weak[j])
            d = (norm(torch.from_numpy(np.array(s))[None])[0] - b.strong[j]).abs().max().item()
            assert d == 0, (j, int(b.index[j]), d)
    _, ref_val = first_batches(cfg, 1)
    assert torch.equal(next(iter(ref_val)).image, next(iter(ffcv_val)).image)


def test_views_drawn_ahead_for_the_next_epoch_are_that_epochs(demo_root, demo_betons):
    """Padded crops: each epoch's boxes are filled in the background during the previous epoch."""
    from pipelines.device import Normalizer
    from pipelines.sources import demo_source
    from pipelines.torch_backend import TwoViewDataset
    cfg = cfg_for(demo_root, demo_betons, "ffcv")
    train, _, _ = build_loaders(cfg, CPU)
    src = demo_source(demo_root, True)
    ds, norm = TwoViewDataset(src, cfg.data, cfg.pipeline, cfg.run.seed), Normalizer(src.mean_std, "cpu")
    for epoch in (0, 1, 2, 5, 6):  # 5 was not drawn ahead: filled on the spot
        train.set_epoch(epoch)
        for n, b in enumerate(train):
            for j in range(0, 32, 7):
                w, s, _, _ = ds[(epoch, int(b.index[j]))]
                assert torch.equal(norm(torch.from_numpy(np.array(w))[None])[0], b.weak[j]), (epoch, n, j)
                assert torch.equal(norm(torch.from_numpy(np.array(s))[None])[0], b.strong[j]), (epoch, n, j)
        assert train.table.parity[0] == epoch % 2 and train.table.filled[epoch % 2] == epoch
    assert train.table._ahead[0] == 7


def test_each_sample_is_decoded_once_per_epoch_and_runs_are_deterministic(demo_root, demo_betons, first_batches):
    a, _, train = first_batches(cfg_for(demo_root, demo_betons, "ffcv"), with_train=True)
    seen = torch.cat([b.index for b in a])
    counts = train.table.decodes
    assert (counts[seen.numpy()] == 1).all() and counts.sum() == len(seen)
    b, _ = first_batches(cfg_for(demo_root, demo_betons, "ffcv"))
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.weak, y.weak) and torch.equal(x.strong, y.strong)
        assert torch.equal(y.index_host, y.index.cpu()) and y.index_host.device.type == "cpu"


def test_sidecar_mismatch_and_truncation_are_caught(demo_root, demo_betons, tmp_path):
    with pytest.raises(DataError, match="10 classes but data.num_classes=100"):
        build_loaders(cfg_for(demo_root, demo_betons, "ffcv", "data.num_classes=100"), CPU)
    bad = str(tmp_path / "t")
    shutil.copytree(demo_betons, bad)
    with open(os.path.join(bad, "train.beton"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(bad, "train.beton")) // 2)
    with pytest.raises(DataError, match="truncated"):
        build_loaders(cfg_for(demo_root, bad, "ffcv"), CPU)
    os.remove(os.path.join(bad, "val.beton.json"))
    with pytest.raises(DataError, match="missing sidecar"):
        from pipelines.ffcv_backend import check_sidecar
        check_sidecar(os.path.join(bad, "val.beton"), cfg_for(demo_root, bad, "ffcv"))
    side = json.load(open(os.path.join(demo_betons, "train.beton.json")))
    assert side["dataset"] == "demo"


def _edit_sidecar(folder, name, edit):
    path = os.path.join(folder, name + ".json")
    meta = json.load(open(path))
    edit(meta)
    json.dump(meta, open(path, "w"))


@pytest.mark.parametrize("case", ["classes", "order", "count", "split", "dataset", "garbage"])
def test_sidecar_must_match_the_dataset_split_and_classes(demo_root, demo_betons, tmp_path, case):
    """A .beton paired with another label mapping, split or file list is refused before training."""
    bad = str(tmp_path / "s")
    shutil.copytree(demo_betons, bad)
    if case == "split":  # the train .beton placed as val.beton
        shutil.copy(os.path.join(bad, "train.beton"), os.path.join(bad, "val.beton"))
        shutil.copy(os.path.join(bad, "train.beton.json"), os.path.join(bad, "val.beton.json"))
    elif case == "garbage":
        open(os.path.join(bad, "train.beton.json"), "w").write("{not json")
    else:
        _edit_sidecar(bad, "train.beton", {
            "classes": lambda m: m["classes"].__setitem__(3, "not_" + m["classes"][3]),
            "order": lambda m: m.__setitem__("classes", m["classes"][::-1]),
            "count": lambda m: m.__setitem__("num_samples", m["num_samples"] - 1),
            "dataset": lambda m: m.__setitem__("dataset", "cifar100")}[case])
    match = {"classes": "class names differ .*position 3", "order": "class names differ", "count": "holds",
             "split": "'train' split but used as the val split", "dataset": "dataset 'cifar100'",
             "garbage": "unreadable sidecar"}[case]
    with pytest.raises(DataError, match=match):
        build_loaders(cfg_for(demo_root, bad, "ffcv"), CPU)


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_resized_views_decode_once_and_match_the_reference(tmp_path, mode, first_batches):
    root = make_jpeg_folder(str(tmp_path / "j"), train=32, val=8, classes=4, size=(96, 72))
    for split in ("train", "val"):
        prep(["--format", "imagefolder", "--src", root, "--split", split, "--out", f"{root}/ffcv/{split}.beton",
              "--num-workers", "1", "--write-mode", mode, "--jpeg-quality", "95"])
    over = ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=4", "data.image_size=48",
            "data.train_crop=rrc", "data.val_resize=56", "pipeline.batch_size=8", "pipeline.num_workers=1"]
    f, _, f_train = first_batches(load_config(None, over + ["pipeline.name=ffcv"]), 2, with_train=True)
    seen = torch.cat([b.index for b in f]).numpy()
    counts = f_train.table.decodes  # resized crops: FFCV decodes once, the host cuts both views
    assert (counts[seen] == 1).all() and counts.max() == 1
    t, _ = first_batches(load_config(None, over + ["pipeline.name=torch"]), 4)
    ref = {int(i): (b.weak[k], b.strong[k]) for b in t for k, i in enumerate(b.index)}
    pairs = [(f_b.weak[k], f_b.strong[k], *ref[int(i)]) for f_b in f for k, i in enumerate(f_b.index)
             if int(i) in ref]
    grey = 1 / (0.225 * 255)  # one grey level after normalisation (std ~0.225)
    assert pairs
    for fw, fs, rw, rs in pairs:
        if mode == "raw":  # the source's pixels; torch's antialiased resize vs PIL's: a level at most
            assert (fw - rw).abs().max() < 1.01 * grey  # (the strong ops can turn a level into more: mean)
            assert (fs - rs).abs().mean() < 0.5 * grey
        else:  # re-encoded by the conversion: quality 95 alone moves these textured images ~2.3 levels mean
            assert (fw - rw).abs().mean() < 4 * grey and (fs - rs).abs().mean() < 5 * grey


def test_one_epoch_crld_through_ffcv(demo_betons, one_epoch_crld):
    one_epoch_crld("ffcv", f"pipeline.ffcv_dir={demo_betons}", "data.subset=0", "pipeline.batch_size=64",
                   "pipeline.num_workers=1")


def test_the_demo_subset_copy_holds_the_images_data_subset_selects(demo_root, tmp_path):
    """What `demo.py --quick --pipeline ffcv` converts: the training images `data.subset=256` trains on, in its
    order, the whole test split and the whole training split's mean/std (what a data.subset run normalises with)."""
    from datasets_prep.make_demo import make_demo_subset
    from pipelines.sources import subset
    from pipelines.sources import demo_source
    out = make_demo_subset(demo_root, str(tmp_path / "sub"), 256)
    want, got = subset(demo_source(demo_root, True), 256), demo_source(out, True)
    assert len(got) == 256 and np.array_equal(got.images, want.images) and np.array_equal(got.labels, want.labels)
    assert got.mean_std == want.mean_std and got.classes == want.classes
    test, full = demo_source(out, False), demo_source(demo_root, False)
    assert np.array_equal(test.images, full.images) and np.array_equal(test.labels, full.labels)
    stamp = os.path.getmtime(os.path.join(out, "train.npz"))
    assert make_demo_subset(demo_root, out, 256) == out and os.path.getmtime(os.path.join(out, "train.npz")) == stamp
    make_demo_subset(demo_root, out, 128)  # another size replaces the copy
    assert len(demo_source(out, True)) == 128


def test_demo_quick_through_ffcv_converts_and_trains(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "demo.py"), "--quick", "--pipeline", "ffcv", "--out",
                        str(tmp_path / "runs"), "--data", str(tmp_path / "demo")], cwd=root, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pipeline ffcv" in r.stdout and "| student resnet8 (crld) |" in r.stdout
    side = json.load(open(tmp_path / "demo" / "subset256" / "ffcv" / "train.beton.json"))
    assert side["num_samples"] == 256  # quick mode trains on data.subset=256's images, as with every backend
    assert not os.path.exists(tmp_path / "demo" / "ffcv")  # the whole demo set is not converted
    assert "Exception ignored" not in r.stderr


def test_quasi_random_order_covers_the_epoch_and_is_refused_under_ddp(demo_root, demo_betons, first_batches):
    cfg = cfg_for(demo_root, demo_betons, "ffcv", "pipeline.ffcv_order=quasi_random", "pipeline.ffcv_os_cache=false",
                  "pipeline.drop_last=false")
    batches, _, train = first_batches(cfg, with_train=True)
    seen = torch.cat([b.index_host for b in batches])
    assert sorted(seen.tolist()) == list(range(len(train.loader.indices)))
    with pytest.raises(DataError, match="ffcv_order=quasi_random: .*no distributed"):
        build_loaders(cfg, CPU, rank=0, world=2)


def test_batches_arrive_in_the_training_dtype(demo_root, demo_betons):
    from tests.test_pipeline import assert_batches_arrive_in_the_amp_dtype
    assert_batches_arrive_in_the_amp_dtype(lambda amp: cfg_for(demo_root, demo_betons, "ffcv", f"run.amp={amp}"))


@pytest.mark.parametrize("crop", ["pad", "rrc"])
def test_the_accelerator_route_run_on_the_cpu_matches_the_host_route(demo_root, demo_betons, tmp_path, crop,
                                                                     first_batches):
    """`pipeline.route=device` on the CPU: both views cut in FFCV's compiled decoder, uint8 views to the
    device, the batched tensor augmenter and normalisation there. Padded crops equal the host route's
    batches exactly; resized crops use FFCV's OpenCV resize there (torch's antialiased one on the host
    route): within 2 grey levels on average (3 for the strong view), on noise images, the worst case."""
    if crop == "pad":
        cfg = cfg_for(demo_root, demo_betons, "ffcv")
    else:
        root = make_jpeg_folder(str(tmp_path / "j"), train=32, val=8, classes=4, size=(96, 72))
        for split in ("train", "val"):
            prep(["--format", "imagefolder", "--src", root, "--split", split, "--out",
                  f"{root}/ffcv/{split}.beton", "--num-workers", "1", "--write-mode", "raw"])
        cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=4",
                                 "data.image_size=48", "data.train_crop=rrc", "data.val_resize=56",
                                 "pipeline.batch_size=8", "pipeline.num_workers=1", "pipeline.name=ffcv"])
    on_host, _ = first_batches(cfg, 2, epoch=1)
    on_dev, _ = first_batches(OmegaConf.merge(cfg, {"pipeline": {"route": "device"}}), 2, epoch=1)
    std = 0.225 * 255  # normalised units -> grey levels
    for a, b in zip(on_host, on_dev):
        assert torch.equal(a.index, b.index) and torch.equal(a.target, b.target)
        assert b.weak.is_contiguous(memory_format=torch.channels_last)
        if crop == "pad":  # on a CPU the tensor ops equal PIL exactly (test_augment_segmented)
            assert torch.equal(a.weak, b.weak) and torch.equal(a.strong, b.strong)
        else:  # the stated tolerance of FFCV's compiled resize (OpenCV INTER_AREA) against torch's (PIL's filter)
            assert (a.weak - b.weak).abs().mean() * std < 2.0 and (a.strong - b.strong).abs().mean() * std < 3.0
