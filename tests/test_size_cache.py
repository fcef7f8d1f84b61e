"""The on-disk cache of the image-size table (pipelines/size_table.py, sources.image_sizes): a second start
reads no headers, changed and new files are read again, errors are never hidden, a bad cache file or an
unwritable folder is no error."""
import os
import tempfile

import numpy as np
import pytest
from PIL import Image

from common import files
from pipelines import size_table, sources
from pipelines.sources import DataError, FolderSource, image_sizes


@pytest.fixture
def reads(monkeypatch):
    """The paths whose header image_sizes reads, in a list."""
    seen = []
    real = sources.header_hw

    def counting(path):
        seen.append(path)
        return real(path)
    monkeypatch.setattr(sources, "header_hw", counting)
    return seen


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """An empty $XDG_CACHE_HOME, so no test reads or writes the real user cache."""
    d = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(d))
    return d


@pytest.fixture
def split(tmp_path, jpeg_folder, user_cache):
    """The train split of a two-class folder: six 40 x 48 JPEGs."""
    return os.path.join(jpeg_folder(str(tmp_path / "data")), "train")


def save_jpeg(path, w, h, seed=1):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def test_second_start_reads_no_headers(split, reads):
    src = FolderSource(split)
    first = image_sizes(src, threads=2)
    assert len(reads) == len(src.files) == 6
    assert os.path.isfile(os.path.join(split, ".crld_sizes.npz"))
    assert first.tolist() == [[48, 40]] * 6
    reads.clear()
    second = image_sizes(FolderSource(split), threads=2)
    assert reads == []
    assert second.dtype == np.int64 and second.tolist() == first.tolist()


def test_the_cache_file_is_not_taken_for_a_class(split):
    image_sizes(FolderSource(split))
    assert FolderSource(split).classes == ["cat", "dog"]


def test_cache_off_reads_every_start_and_writes_nothing(split, reads):
    image_sizes(FolderSource(split), cache=False)
    image_sizes(FolderSource(split), cache=False)
    assert len(reads) == 12
    assert not os.path.exists(os.path.join(split, ".crld_sizes.npz"))


def test_rewritten_file_is_read_again(split, reads):
    image_sizes(FolderSource(split))
    changed = os.path.join(split, "dog", "1.jpg")
    save_jpeg(changed, 30, 20)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new time even on a coarse clock
    reads.clear()
    sizes = image_sizes(FolderSource(split))
    assert reads == [changed]
    assert sizes[FolderSource(split).files.index(changed)].tolist() == [20, 30]


def test_touched_file_same_bytes_is_read_again(split, reads):
    image_sizes(FolderSource(split))
    touched = os.path.join(split, "cat", "0.jpg")
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    reads.clear()
    image_sizes(FolderSource(split))
    assert reads == [touched]


def test_new_file_is_picked_up(split, reads):
    image_sizes(FolderSource(split))
    new = os.path.join(split, "cat", "9.jpg")
    save_jpeg(new, 64, 24)
    reads.clear()
    src = FolderSource(split)
    sizes = image_sizes(src)
    assert reads == [new]
    assert sizes[src.files.index(new)].tolist() == [24, 64]
    reads.clear()
    image_sizes(FolderSource(split))
    assert reads == []


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_truncated_jpeg_still_refused_on_the_second_start(split, reads):
    image_sizes(FolderSource(split))  # a good table cached first: the truncation must not hide behind it
    bad = os.path.join(split, "cat", "2.jpg")
    truncate(bad)
    for _ in range(2):
        with pytest.raises(DataError, match="2.jpg"):
            image_sizes(FolderSource(split))
    # the good files' sizes were kept: only the bad one is read at each start
    assert reads[len(reads) - 2:] == [bad, bad] and len(reads) == 8


def test_truncated_jpeg_on_a_cold_start_caches_only_good_files(split, reads):
    bad = os.path.join(split, "dog", "0.jpg")
    truncate(bad)
    with pytest.raises(DataError, match="0.jpg"):
        image_sizes(FolderSource(split))
    reads.clear()
    with pytest.raises(DataError, match="0.jpg"):
        image_sizes(FolderSource(split))
    assert reads == [bad]


def test_skip_mode_bad_file_is_zero_every_start_and_not_cached(split, reads):
    bad = os.path.join(split, "dog", "2.jpg")
    truncate(bad)
    for _ in range(2):
        src = FolderSource(split, skip_bad=True)
        sizes = image_sizes(src)
        assert sizes[src.files.index(bad)].tolist() == [0, 0]
        assert (np.delete(sizes, src.files.index(bad), axis=0) > 0).all()
    assert reads[6:] == [bad]
    with np.load(os.path.join(split, ".crld_sizes.npz")) as z:
        assert len(z["hw"]) == 5 and (z["hw"] > 0).all()


def test_file_gone_bad_after_caching_is_zero_in_skip_mode(split):
    image_sizes(FolderSource(split, skip_bad=True))
    bad = os.path.join(split, "cat", "1.jpg")
    truncate(bad)
    src = FolderSource(split, skip_bad=True)
    assert image_sizes(src)[src.files.index(bad)].tolist() == [0, 0]


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04garbage"])
def test_corrupt_cache_file_is_ignored_and_rewritten(split, reads, content):
    path = os.path.join(split, ".crld_sizes.npz")
    with open(path, "wb") as f:
        f.write(content)
    sizes = image_sizes(FolderSource(split))
    assert len(reads) == 6 and sizes.tolist() == [[48, 40]] * 6
    reads.clear()
    image_sizes(FolderSource(split))
    assert reads == []


def test_cache_of_another_version_or_shape_is_ignored(split, reads):
    path = os.path.join(split, ".crld_sizes.npz")
    image_sizes(FolderSource(split))
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(path, **dict(arrays, hw=arrays["hw"][:3]))
    reads.clear()
    image_sizes(FolderSource(split))
    assert len(reads) == 6
    np.savez(path, **dict(arrays, version=np.int64(size_table._VERSION + 1)))
    reads.clear()
    image_sizes(FolderSource(split))
    assert len(reads) == 6
    np.savez(path, **dict(arrays, hw=np.zeros_like(arrays["hw"])))  # current stats, no sizes: not a hit
    reads.clear()
    assert image_sizes(FolderSource(split)).tolist() == [[48, 40]] * 6
    assert len(reads) == 6


def refuse_writes_in(monkeypatch, *dirs):
    """Writes into these folders fail as on a read-only mount (the tests run as root, where a chmod does not
    stop a write)."""
    real = tempfile.mkstemp
    refused = [os.path.realpath(d) for d in dirs]

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and any(os.path.realpath(dir).startswith(r) for r in refused):
            raise PermissionError(13, "Read-only file system", dir)
        return real(*args, dir=dir, **kw)
    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)


def test_read_only_folder_falls_back_to_the_user_cache(split, reads, user_cache, monkeypatch):
    refuse_writes_in(monkeypatch, split)
    image_sizes(FolderSource(split))
    assert not os.path.exists(os.path.join(split, ".crld_sizes.npz"))
    assert [p.name for p in (user_cache / "crld").iterdir()] == [os.path.basename(size_table.cache_paths(split)[1])]
    reads.clear()
    image_sizes(FolderSource(split))
    assert reads == []


def test_user_cache_newer_than_a_stale_table_beside_the_data_is_used(split, reads, monkeypatch):
    image_sizes(FolderSource(split))  # written beside the data
    new = os.path.join(split, "dog", "7.jpg")
    save_jpeg(new, 16, 16)
    refuse_writes_in(monkeypatch, split)  # the folder turned read-only
    image_sizes(FolderSource(split))
    reads.clear()
    image_sizes(FolderSource(split))
    assert reads == []


def test_nothing_writable_reads_headers_without_error(split, reads, user_cache, monkeypatch):
    refuse_writes_in(monkeypatch, split, str(user_cache))
    for _ in range(2):
        assert image_sizes(FolderSource(split)).tolist() == [[48, 40]] * 6
    assert len(reads) == 12
    assert not os.path.exists(os.path.join(split, ".crld_sizes.npz"))
    assert not list(user_cache.rglob("*.npz"))


def test_no_temp_files_left(split):
    image_sizes(FolderSource(split))
    image_sizes(FolderSource(split))
    assert sorted(os.listdir(split)) == [".crld_sizes.npz", "cat", "dog"]


def test_moved_folder_keeps_its_table(tmp_path, split, reads):
    image_sizes(FolderSource(split))
    moved = str(tmp_path / "moved")
    os.rename(split, moved)
    reads.clear()
    image_sizes(FolderSource(moved))
    assert reads == []


@pytest.mark.parametrize("on", [True, False])
def test_dali_size_cache_key(tmp_path, jpeg_folder, user_cache, on):
    pytest.importorskip("nvidia.dali")
    import torch

    from pipelines import build_loaders
    from training.config import load_config
    root = jpeg_folder(str(tmp_path / "data"))
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=2",
                             "data.image_size=32", "data.train_crop=rrc", "data.val_resize=36",
                             "pipeline.batch_size=2", "pipeline.num_workers=0", "pipeline.name=dali",
                             f"pipeline.dali_size_cache={str(on).lower()}"])
    build_loaders(cfg, torch.device("cpu"), 0, 1)
    for split in ("train", "val"):
        assert os.path.isfile(os.path.join(root, split, ".crld_sizes.npz")) == on
    assert not list(user_cache.rglob("*.npz"))
