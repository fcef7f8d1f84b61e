"""The `dali` backend (CPU mode here): same contract and views as the reference backend."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from datasets_prep.make_jpeg_folder import make_jpeg_folder  # noqa: E402
from pipelines import build_loaders  # noqa: E402
from pipelines.augment_spec import CUTOUT_FILL  # noqa: E402
from pipelines.sources import DataError  # noqa: E402
from training.config import load_config  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_jpeg_folder(str(tmp_path_factory.mktemp("jpeg") / "f"), train=48, val=12, classes=4, size=(96, 72))


def jpeg_cfg(root, pipe, *over):
    return load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=4",
                              "data.image_size=48", "data.train_crop=rrc", "data.val_resize=56",
                              "pipeline.batch_size=8", "pipeline.num_workers=0", f"pipeline.name={pipe}", *over])


def test_demo_batches_equal_the_reference_backend_exactly(demo_cfg, first_batches):
    (ref, ref_val), (got, got_val) = (first_batches(demo_cfg(pipeline=p), 3, epoch=1) for p in ("torch", "dali"))
    ref_val, got_val = next(iter(ref_val)), next(iter(got_val))
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y)
        assert b.weak.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ref_val.image, got_val.image) and torch.equal(ref_val.index, got_val.index)


def test_jpeg_views_match_the_reference_within_tolerance(jpegs, first_batches):
    (ref, ref_val), (got, got_val) = (first_batches(jpeg_cfg(jpegs, p), 2) for p in ("torch", "dali"))
    ref_val, got_val = next(iter(ref_val)), next(iter(got_val))
    std = 0.225 * 255  # normalised units -> grey levels
    for a, b in zip(ref, got):
        assert torch.equal(a.index, b.index) and torch.equal(a.target, b.target)
        assert b.weak.shape == (8, 3, 48, 48) and b.strong.shape == (8, 3, 48, 48)
        # documented tolerance: decoders and resize filters differ by a level or two per pixel
        assert (a.weak - b.weak).abs().mean() * std < 1.0
        assert (a.strong - b.strong).abs().mean() * std < 2.0
    assert (ref_val.image - got_val.image).abs().mean() * std < 1.0


def test_views_differ_and_the_strong_one_shows_cutout(demo_root, demo_cfg, first_batches):
    bs, _ = first_batches(demo_cfg(pipeline="dali"), 2)
    from pipelines.sources import demo_source
    mean, std = demo_source(demo_root, True).mean_std
    fill = (torch.tensor(CUTOUT_FILL) / 255.0 - torch.tensor(mean)) / torch.tensor(std)
    hits = 0
    for b in bs:
        assert not torch.equal(b.weak, b.strong)
        is_fill = ((b.strong - fill.view(1, 3, 1, 1)).abs() < 1e-4).all(1)  # (N, H, W)
        hits += int((is_fill.flatten(1).sum(1) >= 4).sum())
    assert hits >= 16  # most samples get a visible Cutout square


def test_same_seed_same_batches(jpegs, first_batches):
    a, _ = first_batches(jpeg_cfg(jpegs, "dali"), 3)
    b, _ = first_batches(jpeg_cfg(jpegs, "dali"), 3)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    c, _ = first_batches(jpeg_cfg(jpegs, "dali", "run.seed=3"), 1)
    assert not torch.equal(a[0].weak, c[0].weak)


def test_two_ranks_cover_the_epoch_once(jpegs, first_batches):
    seen = []
    for r in range(2):
        bs, _ = first_batches(jpeg_cfg(jpegs, "dali", "pipeline.batch_size=8"), rank=r, world=2)
        assert len(bs) == 48 // 8  # global batch 8 -> 4 per rank, 24 samples per rank
        seen.append(torch.cat([b.index for b in bs]).tolist())
    assert len(seen[0]) == len(seen[1]) == 24
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(48))


def test_corrupt_jpeg_is_named_or_skipped(jpegs, tmp_path, first_batches):
    root = str(tmp_path / "bad")
    shutil.copytree(jpegs, root)
    victim = sorted(os.listdir(os.path.join(root, "train", "class_001")))[0]
    path = os.path.join(root, "train", "class_001", victim)
    with open(path, "r+b") as f:
        f.truncate(300)  # a JPEG cut short
    with pytest.raises(DataError, match=victim):
        first_batches(jpeg_cfg(root, "dali", "pipeline.batch_size=48"))
    bs, _ = first_batches(jpeg_cfg(root, "dali", "pipeline.batch_size=48", "data.skip_bad_images=true"))
    assert bs[0].weak.shape[0] == 48 and torch.isfinite(bs[0].weak).all()


def test_skip_mode_skips_a_jpeg_with_a_bad_huffman_table(jpegs, tmp_path, caplog, first_batches):
    """Its header parses and it ends with EOI, but neither PIL nor DALI can decode it."""
    root = str(tmp_path / "huff")
    shutil.copytree(jpegs, root)
    folder = os.path.join(root, "train", "class_002")
    path = os.path.join(folder, sorted(os.listdir(folder))[1])
    raw = bytearray(open(path, "rb").read())
    dht = raw.find(b"\xff\xc4")
    raw[dht + 5:dht + 25] = b"\xff" * 20
    open(path, "wb").write(bytes(raw))
    with caplog.at_level(logging.WARNING):
        bs, _ = first_batches(jpeg_cfg(root, "dali", "pipeline.batch_size=48", "data.skip_bad_images=true"))
    assert bs[0].weak.shape[0] == 48 and torch.isfinite(bs[0].weak).all()
    assert any(os.path.basename(path) in r.getMessage() for r in caplog.records)


def test_an_iteration_left_early_does_not_leak_into_the_next(demo_cfg, first_batches):
    """DALI prefetches: after a `break`, the next epoch must still start with its own first batch."""
    cfg = demo_cfg(pipeline="dali")
    train, _, _ = build_loaders(cfg, CPU)
    for _ in zip(range(2), train):
        pass
    train.set_epoch(1)
    got = [b.index.tolist() for b in train]
    fresh, _ = first_batches(cfg, epoch=1)
    assert got == [b.index.tolist() for b in fresh]
    held = iter(train)  # an iterator kept open while a new epoch starts, and closed during it
    next(held)
    train.set_epoch(1)
    it, again = iter(train), []
    again.append(next(it).index.tolist())
    held.close()
    again += [b.index.tolist() for b in it]
    assert again == got


def test_single_view_methods_get_no_strong_view(jpegs, first_batches):
    bs, _ = first_batches(jpeg_cfg(jpegs, "dali", "method.name=kd"), 1)
    assert bs[0].strong is None and bs[0].weak.shape == (8, 3, 48, 48)


def test_one_epoch_crld_run_through_dali(one_epoch_crld):
    one_epoch_crld("dali")


def test_the_accelerator_route_matches_the_reference(demo_cfg, jpegs, first_batches):
    """`pipeline.route=device` on the CPU: files read by DALI, boxes fed to DALI, views cut by fn.slice /
    fn.resize, the strong view through the batched tensor augmenter: what a GPU runs, minus nvJPEG."""
    (ref, _), (got, _) = (first_batches(demo_cfg("pipeline.route=device", pipeline=p), 2, epoch=1)
                          for p in ("torch", "dali"))
    for a, b in zip(ref, got):  # padded crops are exact slices; on a CPU the tensor ops equal PIL exactly
        assert torch.equal(a.index, b.index) and torch.equal(a.weak, b.weak) and torch.equal(a.strong, b.strong)
        assert b.weak.is_contiguous(memory_format=torch.channels_last)
    (ref, ref_val), (got, got_val) = (first_batches(jpeg_cfg(jpegs, p, "pipeline.route=device"), 2)
                                      for p in ("torch", "dali"))
    ref_val, got_val = next(iter(ref_val)), next(iter(got_val))
    std = 0.225 * 255
    for a, b in zip(ref, got):  # DALI's resize filter: within the tolerance of the host route's test
        assert torch.equal(a.index, b.index) and b.weak.is_contiguous(memory_format=torch.channels_last)
        assert (a.weak - b.weak).abs().mean() * std < 1.0 and (a.strong - b.strong).abs().mean() * std < 2.0
    assert (ref_val.image - got_val.image).abs().mean() * std < 1.0


def test_exif_orientation_is_ignored_like_the_reference(tmp_path, first_batches):
    """PIL (the reference, torchvision's loader) keeps a JPEG's stored orientation; DALI's decoders would
    rotate by the EXIF tag by default, and the crop boxes (drawn from the stored size) would not fit."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(tmp_path / "train" / f"c{c}")
        os.makedirs(tmp_path / "val" / f"c{c}")
        for k in range(4):
            img = Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8).repeat(1, 0))
            exif = Image.Exif()
            exif[0x0112] = 6  # "rotate 90 CW to display"
            for split in ("train", "val"):
                img.save(tmp_path / split / f"c{c}" / f"{k}.jpg", quality=95, exif=exif.tobytes())
    root = str(tmp_path)
    (ref, ref_val), (got, got_val) = (first_batches(jpeg_cfg(root, p, "data.num_classes=2"), 1)
                                      for p in ("torch", "dali"))
    ref_val, got_val = next(iter(ref_val)), next(iter(got_val))
    std = 0.225 * 255
    for a, b in zip(ref, got):
        assert torch.equal(a.index, b.index) and (a.weak - b.weak).abs().mean() * std < 2.0
    assert ref_val.image.shape == got_val.image.shape
    assert (ref_val.image - got_val.image).abs().mean() * std < 2.0


def test_epochs_run_back_to_back_with_the_next_one_already_in_flight(demo_cfg, first_batches):
    """At an epoch's end DALI is already on the next epoch's batches; they are the ones a fresh loader makes
    for that epoch, and asking for another epoch instead (a resume, a replayed cache epoch) starts over."""
    cfg = demo_cfg(pipeline="dali")
    train, _, _ = build_loaders(cfg, CPU)
    got = {}
    for epoch in (0, 1, 2, 5, 4):
        train.set_epoch(epoch)
        got[epoch] = [b for b in train]
        assert train._flowing == epoch + 1
    for epoch, bs in got.items():
        fresh, _ = first_batches(cfg, epoch=epoch)
        assert len(bs) == len(fresh) == 6
        for a, b in zip(bs, fresh):
            assert torch.equal(a.index, b.index) and torch.equal(a.weak, b.weak) and torch.equal(a.strong, b.strong)
