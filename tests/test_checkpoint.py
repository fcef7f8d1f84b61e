"""Weight loading: every accepted format, clear failures, and no code execution on load."""
import collections
import os

import pytest
import torch

from training.checkpoint import CheckpointError, atomic_save, load_model_weights
from training.models import create_model


@pytest.fixture
def src():
    torch.manual_seed(0)
    return create_model("resnet8", 10).eval()


def _same(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("fmt", ["model", "state_dict", "bare", "module", "trainer"])
def test_accepted_formats_round_trip(tmp_path, src, fmt):
    sd = src.state_dict()
    obj = {"model": sd, "state_dict": {"state_dict": sd}, "bare": sd,
           "module": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
           "trainer": {"model": sd, "optimizer": {}, "epoch": 3}}[fmt]
    if fmt == "state_dict":
        obj = obj["state_dict"]
        obj = {"state_dict": obj}
    path = str(tmp_path / "w.pth")
    atomic_save(obj, path)
    dst = create_model("resnet8", 10)
    load_model_weights(dst, path)
    assert _same(src, dst)
    assert os.listdir(tmp_path) == ["w.pth"]  # no temp files left behind


def test_wrong_class_count_names_the_mismatch(tmp_path, src):
    path = str(tmp_path / "t.pth")
    torch.save({"model": src.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \(10, 64\) vs model \(100, 64\)"):
        load_model_weights(create_model("resnet8", 100), path)


def test_wrong_architecture_lists_keys(tmp_path, src):
    path = str(tmp_path / "t.pth")
    torch.save({"model": src.state_dict()}, path)
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys|unexpected keys"):
        load_model_weights(create_model("wrn_16_1", 10), path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/crld_pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model_weights(create_model("resnet8", 10), path)
    assert not os.path.exists("/tmp/crld_pwned")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model_weights(create_model("resnet8", 10), str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_model_weights(create_model("resnet8", 10), str(bad))
