"""The `gpu` backend (arrays resident on the device), run on the CPU: same contract and views as the
reference backend, and a per-batch Python cost that does not grow with the batch."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from bench.call_count import CallCounter
from pipelines import build_loaders, gpu_backend
from pipelines.sources import ArraySource, DataError
from training.config import load_config

CPU = torch.device("cpu")
# The tensor augmenter's stated tolerance against PIL (tests/test_augment_segmented.py): a small fraction of
# pixels may differ by rounding on other devices.
MAX_FRAC = 0.002


@pytest.fixture
def cfg(demo_cfg):
    """cfg(pipeline, *overrides): the shared demo config, the accelerator route forced on the CPU."""
    return lambda pipeline, *over: demo_cfg("pipeline.route=device", *over, pipeline=pipeline)


def random_source(n, hw=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8), rng.integers(0, 10, n),
                       [str(i) for i in range(10)], ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), "random")


def same(a, b):
    return all(x is y is None or torch.equal(x, y) for x, y in zip(a, b))


def test_pad_crops_equal_the_reference_bit_for_bit(cfg, first_batches):
    (ref, ref_val), (got, got_val) = (first_batches(cfg(p, "pipeline.strong_aug=false"), epoch=1)
                                      for p in ("torch", "gpu"))
    assert len(ref) == len(got) == 96 // 16
    for a, b in zip(ref, got):
        assert all(x.dtype == y.dtype and x.shape == y.shape for x, y in zip(a, b)) and same(a, b)
        assert b.weak.is_contiguous(memory_format=torch.channels_last)
        assert b.strong.is_contiguous(memory_format=torch.channels_last)
        assert b.index_host.device.type == "cpu" and b.index_host.dtype == torch.int64
    ref_val, got_val = list(ref_val), list(got_val)
    assert len(ref_val) == len(got_val) and all(same(a, b) for a, b in zip(ref_val, got_val))


def test_strong_views_match_the_reference_within_the_augmenter_tolerance(cfg, first_batches):
    (ref, _), (got, _) = (first_batches(cfg(p), epoch=2) for p in ("torch", "gpu"))
    for a, b in zip(ref, got):
        assert torch.equal(a.index, b.index) and torch.equal(a.target, b.target) and torch.equal(a.weak, b.weak)
        assert b.strong.dtype == a.strong.dtype and b.strong.is_contiguous(memory_format=torch.channels_last)
        differ = (a.strong != b.strong).any(1)  # (N, H, W): pixels with any channel off
        assert differ.float().mean() <= MAX_FRAC
        assert not torch.equal(b.weak, b.strong)


def test_two_builds_make_the_same_batches_another_seed_or_epoch_other_ones(cfg, first_batches):
    first, again = (first_batches(cfg("gpu"), n=2)[0] for _ in range(2))
    assert all(same(x, y) for x, y in zip(first, again))
    for over, epoch in (("run.seed=3", 0), ("run.seed=0", 1)):
        other, _ = first_batches(cfg("gpu", over), n=1, epoch=epoch)
        assert not torch.equal(first[0].index, other[0].index)


def test_two_ranks_shard_the_epoch_as_the_reference_does(cfg, first_batches):
    seen = []
    for r in range(2):  # 91 samples: each rank gets 46, the epoch padded by wrapping one sample
        (ref, _), (got, _) = (first_batches(cfg(p, "data.subset=91", "pipeline.drop_last=false"),
                                            epoch=1, rank=r, world=2) for p in ("torch", "gpu"))
        assert len(got) == len(ref) == 6  # global batch 16 -> 8 per rank, the last one short
        for a, b in zip(ref, got):
            assert torch.equal(a.index, b.index) and torch.equal(a.weak, b.weak)
        seen.append(torch.cat([b.index for b in got]).tolist())
    assert len(seen[0]) == len(seen[1]) == 46
    assert set(seen[0]) | set(seen[1]) == set(range(91)) and len(set(seen[0]) & set(seen[1])) == 1


def test_without_drop_last_the_last_batch_is_short(cfg):
    loader = gpu_backend.build_train(random_source(40), cfg("gpu", "pipeline.drop_last=false"), CPU, device_route=True)
    assert [len(b.index) for b in loader] == [16, 16, 8] and len(loader) == 3


def test_single_view_methods_get_no_strong_view(cfg, first_batches):
    (ref, _), (got, _) = (first_batches(cfg(p, "method.name=kd"), n=1) for p in ("torch", "gpu"))
    assert got[0].strong is None and got[0].weak.shape == (16, 3, 32, 32)
    assert torch.equal(ref[0].weak, got[0].weak)


def test_python_calls_per_batch_do_not_grow_with_the_batch(cfg):
    src = random_source(300)
    calls = {}
    for bs in (32, 128):
        with CallCounter() as c:
            loader = gpu_backend.build_train(src, cfg("gpu", f"pipeline.batch_size={bs}"), CPU, device_route=True)
            it = iter(loader)
            next(it)
            with c.window():
                next(it)
        calls[bs] = c.calls
    assert calls[128] <= 1.3 * calls[32] and calls[128] <= 3000, calls


def test_validation_under_ddp_counts_each_sample_once(cfg, first_batches):
    _, ref_val = first_batches(cfg("torch", "pipeline.val_batch_size=64"), n=1)
    ref = torch.cat([b.image for b in ref_val])
    seen = []
    for r in range(2):
        _, val = first_batches(cfg("gpu", "pipeline.val_batch_size=64"), n=1, rank=r, world=2)
        index = torch.cat([b.index for b in val])
        assert torch.equal(torch.cat([b.image for b in val]), ref[index])
        seen += index.tolist()
    assert sorted(seen) == list(range(len(ref)))


def test_resized_crops_are_refused_naming_the_key(cfg):
    with pytest.raises(UserError, match="data.train_crop"):
        build_loaders(cfg("gpu", "data.train_crop=rrc"), CPU)


def folder_cfg(root, pipeline):
    return load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=2",
                              "data.image_size=16", "data.crop_padding=2", "pipeline.batch_size=4",
                              "pipeline.num_workers=0", f"pipeline.name={pipeline}", "pipeline.route=device"])


def every_batch(cfg, first_batches):
    train, val = first_batches(cfg)
    return train + list(val)


@pytest.fixture
def folder(jpeg_folder, tmp_path):
    """20 training and 20 validation JPEGs of 16x16 in two classes."""
    return jpeg_folder(str(tmp_path / "f"), per_class=10, size=(16, 16))


def test_jpeg_folder_round_trips_through_the_array_cache(folder, first_batches, monkeypatch):
    ref, got = (every_batch(folder_cfg(folder, p), first_batches) for p in ("torch", "gpu"))
    cached = os.listdir(os.path.join(folder, ".crld_arrays"))
    assert len([f for f in cached if f.endswith(".npy")]) == 4  # train and val, images and labels each
    assert not any(f.startswith(".tmp") for f in cached)
    assert len(ref) == len(got) and all(same(a, b) for a, b in zip(ref, got))

    def no_decoding(*a):
        raise AssertionError("decoded again despite the cache")
    monkeypatch.setattr(gpu_backend, "_decode_all", no_decoding)
    again = every_batch(folder_cfg(folder, "gpu"), first_batches)
    assert all(same(a, b) for a, b in zip(got, again))


def test_a_read_only_data_folder_caches_under_the_user_cache(folder, first_batches, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not p.startswith(folder) and access(p, mode))
    every_batch(folder_cfg(folder, "gpu"), first_batches)
    assert len([f for f in os.listdir(tmp_path / "home_cache" / "crld") if f.endswith(".npy")]) == 4
    in_root = os.path.join(folder, ".crld_arrays")
    assert not os.path.isdir(in_root) or not os.listdir(in_root)


def test_mixed_image_sizes_name_the_first_differing_file(folder):
    for name in ("dog/2.jpg", "cat/7.jpg"):  # cat/ sorts first: cat/7.jpg is the first that differs
        Image.new("RGB", (16, 12)).save(os.path.join(folder, "train", name))
    with pytest.raises(DataError, match=r"cat/7\.jpg: 16x12 differs.*(dali|ffcv)") as e:
        build_loaders(folder_cfg(folder, "gpu"), CPU)
    assert "\n" not in str(e.value)


def test_one_epoch_crld_run_through_the_gpu_pipeline(one_epoch_crld):
    one_epoch_crld("gpu")
