"""Every backend and route with the `meta` device as the training device: a meta tensor has no data, so any
host tensor combined with one the loader meant for the device raises on the CPU, as a CPU/CUDA mix would
on a GPU; and every batch must arrive on the training device. Each loader follows `contract.Loader`. The strong view runs the graph program
(eager here): the segmented one plans from the data on the host, which meta tensors do not have."""
import itertools

import numpy as np
import pytest
import torch

from pipelines import build_loaders
from pipelines.contract import Loader
from pipelines.device import Normalizer
from training.student import Student

META = torch.device("meta")


def first_train_and_val(cfg):
    train, val, _ = build_loaders(cfg, META)
    assert isinstance(train, Loader) and isinstance(val, Loader)
    train.set_epoch(0)
    return next(iter(train)), next(iter(val))


def assert_on_meta(batch, val):
    for name in ("weak", "strong", "target", "index"):
        t = getattr(batch, name)
        assert t.device == META, name
    assert batch.index_host.device.type == "cpu"
    for t in (batch.weak, batch.strong, val.image):
        assert t.is_contiguous(memory_format=torch.channels_last)
    assert all(t.device == META for t in val)


@pytest.mark.parametrize("pipe, route", itertools.product(["torch", "gpu", "dali"], ["device", "host"]))
def test_every_route_keeps_its_tensors_on_the_training_device(demo_cfg, pipe, route):
    if pipe == "dali":
        pytest.importorskip("nvidia.dali")
    assert_on_meta(*first_train_and_val(demo_cfg(f"pipeline.route={route}", "pipeline.strong_program=graph",
                                                 pipeline=pipe)))


@pytest.mark.parametrize("route, crop", itertools.product(["device", "host"], ["pad", "rrc"]))
def test_every_ffcv_route_keeps_its_tensors_on_the_training_device(demo_root, demo_betons, route, crop):
    pytest.importorskip("ffcv")
    from training.config import load_config
    cfg = load_config(None, ["data.dataset=demo", f"data.root={demo_root}", "data.num_classes=10",
                             "pipeline.batch_size=16", "pipeline.num_workers=1", "pipeline.name=ffcv",
                             f"pipeline.ffcv_dir={demo_betons}", f"pipeline.route={route}",
                             "pipeline.strong_program=graph", f"data.train_crop={crop}"])
    assert_on_meta(*first_train_and_val(cfg))


def test_a_device_normaliser_normalises_host_tensors_on_the_host():
    mean_std = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8))
    want = Normalizer(mean_std, "cpu").into(x, torch.empty(x.shape))
    meta = Normalizer(mean_std, META)
    assert torch.equal(meta.into(x, torch.empty(x.shape)), want)
    assert meta(x).device == META


def test_helper_threads_take_the_training_device_as_their_current_device(monkeypatch):
    """A loader's or the cache's helper thread pins memory: on CUDA it must do so on the rank's GPU, not GPU 0."""
    from pipelines.device import helper_threads
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    with helper_threads(1, torch.device("cuda", 3), "t") as pool:
        pool.submit(lambda: None).result()
    assert calls == [3]
    with helper_threads(1, torch.device("cpu"), "t") as pool:
        pool.submit(lambda: None).result()
    assert calls == [3]


def test_a_checkpoint_resumes_onto_the_training_device_with_its_random_stream(demo_cfg, tmp_path):
    """A CPU checkpoint resumed by a student on the device: weights and optimizer state move to the device,
    the saved random stream stays a CPU byte tensor (set_rng_state refuses any other, as on CUDA)."""
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    Student(demo_cfg(), torch.device("cpu"), str(tmp_path), 4, off, False).save("last.pt")
    st = Student(demo_cfg(), META, str(tmp_path), 4, off, False)
    st.resume(str(tmp_path / "last.pt"))
    assert all(p.device == META for p in st.student.parameters())
    with st.own_rng():
        torch.rand(1)
