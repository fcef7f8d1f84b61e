"""The reference (`torch`) backend: the batch contract, determinism, sharding, sources, bad input."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import build_loaders
from pipelines.sampler import EpochSampler
from pipelines.sources import DataError, open_source
from pipelines.torch_backend import TwoViewDataset
from training.config import load_config


def test_batch_contract(demo_cfg):
    cfg = demo_cfg()
    train, val, src = build_loaders(cfg, torch.device("cpu"))
    assert len(train) == 96 // 16
    b = next(iter(train))
    for x in (b.weak, b.strong):
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert b.target.dtype == torch.int64 and b.index.dtype == torch.int64 and b.index.shape == (16,)
    assert b.index_host.device.type == "cpu" and torch.equal(b.index_host, b.index.cpu())
    # index identifies the sample: its label and its exact weak/strong pixels can be rebuilt.
    assert torch.equal(b.target, torch.as_tensor(src.labels[b.index.numpy()]))
    ds = TwoViewDataset(src, cfg.data, cfg.pipeline, cfg.run.seed)
    mean, std = src.mean_std
    for j in (0, 7):
        w, s, y, i = ds[(0, int(b.index[j]))]
        ref_w = (torch.from_numpy(np.array(w)).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
            / torch.tensor(std)[:, None, None]
        torch.testing.assert_close(b.weak[j], ref_w, rtol=1e-5, atol=1e-5)
        assert not np.array_equal(w, s)
    vb = next(iter(val))
    assert vb.image.shape[1:] == (3, 32, 32) and vb.image.is_contiguous(memory_format=torch.channels_last)
    raw = torch.from_numpy(open_source(cfg.data, False).images[0]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(vb.image[0] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None],
                               raw, rtol=1e-5, atol=1e-5)


def test_single_view_methods_skip_the_strong_view(demo_cfg, first_batches):
    b = first_batches(demo_cfg("method.name=ce"), 1)[0][0]
    assert b.strong is None and b.weak.shape == (16, 3, 32, 32)


def test_same_seed_same_batches_any_worker_count(demo_cfg, first_batches):
    a = first_batches(demo_cfg(), 2, epoch=1)[0]
    b = first_batches(demo_cfg("pipeline.num_workers=2"), 2, epoch=1)[0]
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    c = first_batches(demo_cfg(), 2, epoch=2)[0]
    assert not torch.equal(a[0].index, c[0].index)
    d = first_batches(demo_cfg("run.seed=1"), 2, epoch=1)[0]
    assert not torch.equal(a[0].weak, d[0].weak)


@pytest.mark.parametrize("n", [10, 11])
def test_sharding_is_disjoint_and_equal_length(n):
    shards = [EpochSampler(n, seed=0, shuffle=True, rank=r, world=2) for r in range(2)]
    idx = [s.indices() for s in shards]
    assert len(idx[0]) == len(idx[1]) == len(shards[0]) == -(-n // 2)
    assert set(idx[0]) | set(idx[1]) == set(range(n))
    if n % 2 == 0:
        assert not set(idx[0]) & set(idx[1])


def folder_cfg(root, *over):
    return load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=2",
                              "data.image_size=32", "data.train_crop=rrc", "data.val_resize=36",
                              "pipeline.batch_size=2", "pipeline.num_workers=0", *over])


def test_imagefolder_rrc_and_val_centre_crop(tmp_path, jpeg_folder):
    cfg = folder_cfg(jpeg_folder(str(tmp_path / "f")))
    train, val, src = build_loaders(cfg, torch.device("cpu"))
    assert src.classes == ["cat", "dog"] and len(src) == 6
    b = next(iter(train))
    assert b.weak.shape == (2, 3, 32, 32) and b.strong.shape == (2, 3, 32, 32)
    assert next(iter(val)).image.shape == (6, 3, 32, 32)


def test_corrupt_image_is_named_or_skipped(tmp_path, jpeg_folder):
    root = jpeg_folder(str(tmp_path / "f"))
    bad = os.path.join(root, "train", "cat", "1.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    train, _, _ = build_loaders(folder_cfg(root, "pipeline.batch_size=6"), torch.device("cpu"))
    with pytest.raises(DataError, match="1.jpg: cannot decode image"):
        next(iter(train))
    train, _, _ = build_loaders(folder_cfg(root, "pipeline.batch_size=6", "data.skip_bad_images=true"),
                                torch.device("cpu"))
    assert next(iter(train)).weak.shape[0] == 6


@pytest.mark.parametrize("pipe", ["torch", "dali"])
def test_a_skipped_image_is_replaced_with_its_substitutes_label(tmp_path, pipe, jpeg_folder):
    """The last cat is corrupt: its slot gets the next readable sample, the first dog, labelled dog."""
    if pipe == "dali":
        pytest.importorskip("nvidia.dali")
    root = jpeg_folder(str(tmp_path / "f"))
    with open(os.path.join(root, "train", "cat", "2.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    train, _, src = build_loaders(folder_cfg(root, "pipeline.batch_size=6", "data.skip_bad_images=true",
                                             f"pipeline.name={pipe}"), torch.device("cpu"))
    b = next(iter(train))
    labels = dict(zip(b.index.tolist(), b.target.tolist()))
    assert src.labels[2] == 0 and labels[2] == 1 and labels[0] == 0 and labels[3] == 1


def test_non_image_file_and_layout_errors(tmp_path, jpeg_folder):
    root = jpeg_folder(str(tmp_path / "f"))
    open(os.path.join(root, "train", "cat", "notes.txt"), "w").write("x")
    with pytest.raises(DataError, match="notes.txt: not an image file"):
        build_loaders(folder_cfg(root), torch.device("cpu"))
    os.remove(os.path.join(root, "train", "cat", "notes.txt"))
    os.rename(os.path.join(root, "val", "dog"), os.path.join(root, "val", "bird"))
    with pytest.raises(DataError, match="class folders differ"):
        build_loaders(folder_cfg(root), torch.device("cpu"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        build_loaders(folder_cfg(str(empty)), torch.device("cpu"))
    with pytest.raises(DataError, match="does not exist"):
        build_loaders(folder_cfg(str(tmp_path / "nope")), torch.device("cpu"))


def test_cifar_pickles_and_missing_pickle(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 10)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(rng.integers(0, 100, n))}
        pickle.dump(d, open(root / split, "wb"))
    pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, open(root / "meta", "wb"))
    cfg = load_config(None, [f"data.root={tmp_path}", "pipeline.num_workers=0", "pipeline.batch_size=4"])
    train, val, src = build_loaders(cfg, torch.device("cpu"))
    assert len(src) == 20 and src.images.shape == (20, 32, 32, 3) and src.classes[3] == "c3"
    # CHW pickle rows -> HWC images: the first channel plane is the red channel
    raw = pickle.load(open(root / "train", "rb"))[b"data"][0]
    assert np.array_equal(src.images[0][..., 0].ravel(), raw[:1024])
    assert next(iter(train)).weak.shape == (4, 3, 32, 32)
    os.remove(root / "test")
    with pytest.raises(DataError, match="test: missing CIFAR pickle"):
        build_loaders(cfg, torch.device("cpu"))


def test_jpeg_header_size_equals_pil(tmp_path):
    import io

    from PIL import Image

    from pipelines.sources import jpeg_hw
    rng = np.random.default_rng(0)
    for k, (w, h, mode, kw) in enumerate([(500, 375, "RGB", {}), (37, 301, "RGB", {"progressive": True}),
                                          (64, 48, "L", {}), (320, 200, "RGB", {"exif": b"Exif\x00\x00" + bytes(64)}),
                                          (1, 1, "RGB", {"quality": 5})]):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8), mode)
        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        raw = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        assert jpeg_hw(raw) == (h, w), k
        assert jpeg_hw(raw[:20]) is None  # cut before the frame header
    png = io.BytesIO()
    Image.new("RGB", (5, 4)).save(png, "PNG")
    assert jpeg_hw(np.frombuffer(png.getvalue(), dtype=np.uint8)) is None


def assert_batches_arrive_in_the_amp_dtype(cfg_of):
    """Under AMP the views arrive in the autocast dtype: the fp32 values rounded once, same layout."""
    (t32, v32, _), (t16, v16, _) = (build_loaders(cfg_of(amp), torch.device("cpu")) for amp in ("off", "bf16"))
    a, b = next(iter(t32)), next(iter(t16))
    for x32, x16 in ((a.weak, b.weak), (a.strong, b.strong)):
        assert x32.dtype == torch.float32 and x16.dtype == torch.bfloat16
        assert x16.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x16, x32.to(torch.bfloat16))
    assert torch.equal(next(iter(v16)).image, next(iter(v32)).image.to(torch.bfloat16))


@pytest.mark.parametrize("pipe", ["torch", "dali"])
def test_batches_arrive_in_the_training_dtype(demo_cfg, pipe):
    if pipe == "dali":
        pytest.importorskip("nvidia.dali")
    assert_batches_arrive_in_the_amp_dtype(
        lambda amp: demo_cfg(f"run.amp={amp}", "data.subset=64", pipeline=pipe))
