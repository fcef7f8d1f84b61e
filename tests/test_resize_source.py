"""`data.resize_source`: sources resized (Resize(S), bicubic) before the crop, the released code's Tiny-ImageNet
transform at 384, made the same way by every backend and route. Tiny sizes: 24 px demo images to 40 px."""
import importlib.util
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from pipelines import build_loaders
from pipelines.contract import Batch
from pipelines.device import Normalizer
from pipelines.sources import demo_source
from pipelines.upsample import resize_batch
from pipelines.view_params import WEAK, draw_views
from training.config import load_config

CPU = torch.device("cpu")
S = 40
GREY = 0.225 * 255  # normalised units -> grey levels


@pytest.fixture(scope="module")
def root(demo_cut):
    return demo_cut(96, 64, betons=importlib.util.find_spec("ffcv") is not None)  # (test_preemption's)


def cfg(root, pipe="torch", *over):
    return load_config(None, ["data.dataset=demo", f"data.root={root}", "data.num_classes=10", f"data.image_size={S}",
                              "data.crop_padding=4", f"data.resize_source={S}", "pipeline.batch_size=16",
                              "pipeline.val_batch_size=20", "pipeline.num_workers=0", f"pipeline.name={pipe}",
                              f"pipeline.ffcv_dir={root}/ffcv", *over])


def first(c, n=2):  # FFCV's order is its own: its batches are compared with the reference's whole epoch
    train, val, _ = build_loaders(c, CPU)
    train.set_epoch(1)
    return list(itertools.islice(train, n)), next(iter(val))


@pytest.mark.parametrize("src, dst", [((16, 16), (40, 40)), ((64, 64), (384, 384)), ((24, 17), (40, 56)),
                                      ((31, 13), (12, 9)), ((64, 48), (41, 55))])
def test_the_device_resize_is_pils_bicubic_bit_for_bit(src, dst):
    x = np.random.default_rng(0).integers(0, 256, (2, *src, 3), dtype=np.uint8)
    want = np.stack([np.asarray(Image.fromarray(a).resize(dst[::-1], Image.BICUBIC)) for a in x])
    assert np.array_equal(resize_batch(torch.from_numpy(x), dst).numpy(), want)


def test_the_reference_is_the_released_transform(root):
    """Resize(S, BICUBIC) on the PIL image, then RandomCrop(S, padding=4) (zeros) + flip; validation
    Resize(S) then the centre crop, written here without the project's code."""
    c = cfg(root)
    (got, val), src = first(c, 1), demo_source(root, True)
    norm = Normalizer.for_run(src.mean_std, c, CPU)
    b = got[0]
    idx = b.index.numpy()
    boxes = draw_views(c.run.seed, 1, idx, (S, S), crop="pad", size=S, pad=4).boxes[:, WEAK]
    for j, i in enumerate(idx):
        big = np.pad(np.asarray(Image.fromarray(src.images[i]).resize((S, S), Image.BICUBIC)), ((4, 4), (4, 4), (0, 0)))
        t, l, _, _, f = boxes[j]
        v = big[t + 4:t + 4 + S, l + 4:l + 4 + S]
        v = v[:, ::-1] if f else v
        assert torch.equal(norm(torch.from_numpy(v.copy())[None])[0], b.weak[j])
    vsrc = demo_source(root, False)
    for size in (S, 32):
        _, val = first(cfg(root, "torch", f"data.image_size={size}"), 0) if size != S else (None, val)
        for j, i in enumerate(val.index.tolist()[:4]):
            v = np.asarray(Image.fromarray(vsrc.images[i]).resize((S, S), Image.BICUBIC))
            o = (S - size) // 2
            want = norm(torch.from_numpy(v[o:o + size, o:o + size].copy())[None])[0]
            assert torch.equal(want, val.image[j])


def _pipelines():
    out = []
    for pipe, route in (("dali", "host"), ("dali", "device"), ("ffcv", "host"), ("ffcv", "device"), ("gpu", "device")):
        lib = {"dali": "nvidia.dali", "ffcv": "ffcv"}.get(pipe)
        marks = [pytest.mark.skipif(lib is not None and importlib.util.find_spec(lib) is None, reason=f"no {lib}")]
        out.append(pytest.param(pipe, route, marks=marks, id=f"{pipe}-{route}"))
    return out


@pytest.mark.parametrize("pipe, route", _pipelines())
def test_every_backend_and_route_makes_the_references_views(root, pipe, route):
    """Bit-equal where the backend is bit-equal to the reference on arrays; DALI's accelerator route resizes
    in its graph (its cubic filter) and its validation always does: within the tolerance of its JPEG tests."""
    (ref, ref_val), (got, got_val) = (first(cfg(root, p, f"pipeline.route={route}"), n)
                                      for p, n in (("torch", None if pipe == "ffcv" else 2), (pipe, 2)))
    exact = not (pipe == "dali" and route == "device")
    if pipe == "ffcv":
        by_index = {int(i): (a, k) for a in ref for k, i in enumerate(a.index)}
        ref = [Batch(*(torch.stack([by_index[int(i)][0][f][by_index[int(i)][1]] for i in b.index])
                       for f in range(4))) for b in got]
    for a, b in zip(ref, got):
        assert torch.equal(a.index, b.index) and torch.equal(a.target, b.target)
        assert b.weak.shape == (16, 3, S, S) and b.weak.is_contiguous(memory_format=torch.channels_last)
        if exact:
            assert torch.equal(a.weak, b.weak)
            # the strong view: PIL on the host route, the tensor augmenter on the device route (equal on a CPU)
            assert (a.strong != b.strong).any(1).float().mean() <= (0.002 if pipe == "gpu" else 0.0)
        else:
            assert (a.weak - b.weak).abs().mean() * GREY < 1.0 and (a.strong - b.strong).abs().mean() * GREY < 2.0
    assert torch.equal(ref_val.index, got_val.index) and ref_val.image.shape == got_val.image.shape
    if pipe == "dali":
        assert (ref_val.image - got_val.image).abs().mean() * GREY < 1.0
    else:
        assert torch.equal(ref_val.image, got_val.image)


def test_the_teacher_cache_tells_resized_sources_apart():
    from training.teacher_cache import view_source
    plain, resized = (view_source(load_config(None, over)) for over in ([], ["data.resize_source=40"]))
    assert plain == "source images" and resized != plain and "40" in resized


@pytest.mark.parametrize("over, key", [(["data.resize_source=-1"], "data.resize_source"),
                                       (["data.image_size=64", "data.resize_source=48"], "data.resize_source"),
                                       (["data.resize_source=64", "data.val_resize=72"], "data.val_resize")])
def test_bad_values_are_refused_naming_the_key(over, key):
    with pytest.raises(UserError, match=f"'{key}'") as e:
        load_config(None, over)
    assert "\n" not in str(e.value)
