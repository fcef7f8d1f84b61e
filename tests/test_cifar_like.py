"""`make_cifar_like` writes what the official 'python version' archives hold, in their pickle form, so that
torchvision's CIFAR classes and the project's reader read the same images, labels and class names."""
import os
import pickle

import numpy as np
import pytest

from datasets_prep.make_cifar_like import make_cifar_like
from pipelines.sources import DataError, cifar_source

# the archives' keys, file by file
ARCHIVE = {
    100: {"train": {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"},
          "test": {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"},
          "meta": {"fine_label_names", "coarse_label_names"}},
    10: {**{f"data_batch_{i}": {"data", "labels", "filenames", "batch_label"} for i in range(1, 6)},
         "test_batch": {"data", "labels", "filenames", "batch_label"},
         "batches.meta": {"label_names", "num_cases_per_batch", "num_vis"}},
}


@pytest.mark.parametrize("classes", [10, 100])
def test_torchvision_and_our_reader_agree(tmp_path, monkeypatch, classes):
    from torchvision.datasets import cifar
    root = make_cifar_like(str(tmp_path), train=23, test=7, classes=classes)
    folder = os.path.join(root, "cifar-100-python" if classes == 100 else "cifar-10-batches-py")
    assert set(os.listdir(folder)) == set(ARCHIVE[classes])
    for name, keys in ARCHIVE[classes].items():
        with open(os.path.join(folder, name), "rb") as f:
            assert set(pickle.load(f, encoding="latin1")) == keys, name  # str keys, as torchvision reads them
    # torchvision checks the md5 of the real archive's files: here only that they exist
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    tv_class = cifar.CIFAR100 if classes == 100 else cifar.CIFAR10
    for train, n in ((True, 23), (False, 7)):
        tv = tv_class(root, train=train, download=False)
        ours = cifar_source(root, train, classes)
        assert ours.images.shape == tv.data.shape == (n, 32, 32, 3)
        assert np.array_equal(ours.images, tv.data)
        assert ours.labels.tolist() == list(tv.targets) and ours.classes == tv.classes
        assert len(set(tv.targets)) > 1 and tv.data.std() > 50  # not constant


def test_reader_takes_python3_pickles_with_str_or_bytes_keys(tmp_path):
    rng = np.random.default_rng(1)
    for as_key in (str.encode, str):
        root = tmp_path / as_key.__name__ / "cifar-100-python"
        root.mkdir(parents=True)
        data = {}
        for split, n in (("train", 5), ("test", 3)):
            data[split] = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist()
            with open(root / split, "wb") as f:
                pickle.dump({as_key("data"): data[split][0], as_key("fine_labels"): data[split][1]}, f)
        with open(root / "meta", "wb") as f:
            pickle.dump({as_key("fine_label_names"): [as_key(f"c{i}") for i in range(100)]}, f)
        src = cifar_source(str(root.parent), True, 100)
        assert src.labels.tolist() == data["train"][1] and src.classes[7] == "c7"
        assert np.array_equal(src.images.transpose(0, 3, 1, 2).reshape(5, -1), data["train"][0])
    with open(root / "test", "wb") as f:
        pickle.dump({"data": data["test"][0], "labels": data["test"][1]}, f)
    with pytest.raises(DataError, match=r"test: CIFAR pickle without \['fine_labels'\]"):
        cifar_source(str(root.parent), False, 100)
