"""`datasets_prep/prep_ffcv.py`: round trips, atomic and idempotent output, bad input."""
import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ffcv")

from datasets_prep.make_jpeg_folder import make_jpeg_folder  # noqa: E402
from datasets_prep.prep_ffcv import main as prep  # noqa: E402
from pipelines.sources import DataError, demo_source  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_beton(path):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(path, batch_size=1, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    return [(img[0].copy(), int(np.asarray(lab).reshape(-1)[0])) for img, lab in loader]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_jpeg_folder(str(tmp_path_factory.mktemp("j") / "f"), train=24, val=8, classes=3, size=(80, 60))


def test_demo_round_trip_is_exact(demo_root, tmp_path):
    out = str(tmp_path / "demo_test.beton")
    meta = prep(["--format", "demo", "--src", demo_root, "--split", "test", "--out", out, "--num-workers", "1"])
    src = demo_source(demo_root, False)
    rows = read_beton(out)
    assert len(rows) == len(src) == meta["num_samples"]
    for i in (0, 7, len(src) - 1):
        assert np.array_equal(rows[i][0], src.images[i]) and rows[i][1] == src.labels[i]
    side = json.load(open(out + ".json"))
    assert side["classes"] == src.classes and sum(side["counts_per_class"]) == len(src)
    assert side["beton_bytes"] == os.path.getsize(out)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_round_trip(tmp_path, classes):
    """The official folder names (cifar-100-python contains "10": the count must come from the files)."""
    rng = np.random.default_rng(0)
    if classes == 10:
        root, train_files, key = tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        meta_file, names_key, test_file = "batches.meta", b"label_names", "test_batch"
    else:
        root, train_files, key = tmp_path / "cifar-100-python", ["train"], b"fine_labels"
        meta_file, names_key, test_file = "meta", b"fine_label_names", "test"
    root.mkdir()
    for name in train_files + [test_file]:
        pickle.dump({b"data": rng.integers(0, 256, (4 * 5 // len(train_files), 3072), dtype=np.uint8),
                     key: list(rng.integers(0, classes, 4 * 5 // len(train_files)))}, open(root / name, "wb"))
    pickle.dump({names_key: [f"c{i}".encode() for i in range(classes)]}, open(root / meta_file, "wb"))
    out = str(tmp_path / "c.beton")
    meta = prep(["--format", "cifar", "--src", str(tmp_path), "--out", out, "--num-workers", "1"])
    assert meta["num_samples"] == 20 and meta["num_classes"] == classes and meta["dataset"] == f"cifar{classes}"
    raw = pickle.load(open(root / train_files[0], "rb"))
    img, lab = read_beton(out)[0]
    assert np.array_equal(img.transpose(2, 0, 1).reshape(-1), raw[b"data"][0]) and lab == raw[key][0]
    other = tmp_path / "not_cifar"
    other.mkdir()
    (other / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no CIFAR-10"):
        prep(["--format", "cifar", "--src", str(other), "--out", out + "2", "--num-workers", "1"])


def test_imagefolder_round_trip_within_jpeg_tolerance(jpegs, tmp_path):
    out = str(tmp_path / "f.beton")
    prep(["--format", "imagefolder", "--src", jpegs, "--split", "val", "--out", out, "--num-workers", "1",
          "--write-mode", "jpg", "--jpeg-quality", "95"])
    from PIL import Image
    from pipelines.sources import FolderSource
    src = FolderSource(os.path.join(jpegs, "val"))
    for (img, lab), path, y in zip(read_beton(out), src.files, src.labels):
        ref = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert img.shape == ref.shape and lab == y
        assert np.abs(img.astype(int) - ref).mean() < 4  # re-encoded at quality 95


def test_rerun_is_a_noop_and_changed_settings_need_overwrite(demo_root, tmp_path, caplog):
    out = str(tmp_path / "d.beton")
    args = ["--format", "demo", "--src", demo_root, "--split", "test", "--out", out, "--num-workers", "1"]
    prep(args)
    stamp = os.path.getmtime(out)
    time.sleep(0.05)
    prep(args)
    assert os.path.getmtime(out) == stamp
    with pytest.raises(DataError, match="--overwrite"):
        prep(args + ["--jpeg-quality", "80"])
    prep(args + ["--jpeg-quality", "80", "--overwrite"])
    assert json.load(open(out + ".json"))["settings"]["jpeg_quality"] == 80


def test_killed_conversion_leaves_no_final_file(jpegs, tmp_path):
    big = make_jpeg_folder(str(tmp_path / "big"), train=8, val=2, classes=2, size=(500, 375))
    for folder in glob.glob(os.path.join(big, "train", "*")):  # 400 files to convert (seconds), 8 images to make
        files = sorted(os.listdir(folder))
        for k in range(200 - len(files)):
            os.link(os.path.join(folder, files[k % len(files)]), os.path.join(folder, f"copy_{k:03d}.jpg"))
    out = str(tmp_path / "k.beton")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "datasets_prep/prep_ffcv.py"), "--format",
                          "imagefolder", "--src", big, "--out", out, "--write-mode", "raw", "--num-workers", "1"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not [f for f in os.listdir(tmp_path) if f.startswith("k.beton.tmp-")]:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not os.path.exists(out) and not os.path.exists(out + ".json")
    meta = prep(["--format", "imagefolder", "--src", big, "--out", out, "--write-mode", "raw",
                 "--num-workers", "1", "--split", "val"])  # a rerun cleans the stale temp file
    assert meta["num_samples"] == 2 and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_corrupt_image_fails_naming_it_or_is_skipped(jpegs, tmp_path):
    root = str(tmp_path / "bad")
    shutil.copytree(jpegs, root)
    victim = os.path.join(root, "train", "class_001", sorted(os.listdir(os.path.join(root, "train", "class_001")))[0])
    open(victim, "wb").write(b"\xff\xd8\xff garbage")
    out = str(tmp_path / "b.beton")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "datasets_prep/prep_ffcv.py"), "--format", "imagefolder",
                        "--src", root, "--out", out, "--num-workers", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and os.path.basename(victim) in r.stderr.strip().splitlines()[-1]
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    notes = os.path.join(root, "train", "class_002", "notes.txt")  # not an image: left out and counted too
    open(notes, "w").write("x")
    meta = prep(["--format", "imagefolder", "--src", root, "--out", out, "--num-workers", "1", "--skip-bad-images"])
    assert meta["skipped_count"] == 2 and sorted(meta["skipped"]) == sorted([victim, notes])
    assert meta["num_samples"] == 23


def test_missing_or_empty_source(tmp_path):
    with pytest.raises(DataError, match="missing or empty"):
        prep(["--format", "imagefolder", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "x.beton")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="missing or empty"):
        prep(["--format", "demo", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "x.beton")])


def test_unwritable_output_and_full_disk_are_clear_errors_with_no_files(demo_root, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = ["--format", "demo", "--src", demo_root, "--split", "test", "--num-workers", "1"]
    with pytest.raises(DataError, match="a_file.*not writable"):
        prep(args + ["--out", str(blocker / "d.beton")])
    out_dir = tmp_path / "o"
    # 1 KiB free: less than any split needs, so the conversion must refuse before FFCV's writer starts
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 2**40 - 2**10, 2**10))
    with pytest.raises(DataError, match="not enough free disk space"):
        prep(args + ["--out", str(out_dir / "d.beton")])
    assert os.listdir(out_dir) == []


def test_a_writer_process_failing_mid_write_is_an_error_not_a_hang(demo_root, tmp_path, monkeypatch):
    """A worker hitting ENOSPC: a one-line error and no temp file (FFCV's own writer would wait forever)."""
    import errno

    from datasets_prep import prep_ffcv
    get = prep_ffcv._Samples.__getitem__

    def failing(self, k):  # inherited by the forked writer processes
        if k == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return get(self, k)
    monkeypatch.setattr(prep_ffcv._Samples, "__getitem__", failing)
    with pytest.raises(DataError, match="writing failed .*GiB free"):
        prep(["--format", "demo", "--src", demo_root, "--split", "test", "--out", str(tmp_path / "d.beton"),
              "--num-workers", "2", "--chunk-size", "4"])
    assert os.listdir(tmp_path) == []


def test_a_really_full_disk_fails_cleanly(jpegs, tmp_path):
    """A 2 MiB tmpfs (less than the writer's pages), past an up-front estimate told 1 KiB per image."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        code = ("import sys; from datasets_prep import prep_ffcv as p; p.estimate_bytes = lambda *a, **k: 1024; "
                "sys.argv[0] = 'prep_ffcv.py'; from training.cli import run_main; sys.exit(run_main(p.main))")
        r = subprocess.run([sys.executable, "-c", code, "--format", "imagefolder", "--src", jpegs, "--out",
                            str(mnt / "f.beton"), "--write-mode", "raw", "--max-resolution", "256",
                            "--num-workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "writing failed" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_failed_writers_with_a_long_queue_still_exit(tmp_path):
    """20,000 one-sample chunks left unread when every writer dies: the process must still exit."""
    code = f"""
import errno, sys
from ffcv.fields import IntField
from datasets_prep.ffcv_writer import CheckedDatasetWriter, WorkerFailed

class Failing:
    def __len__(self):
        return 20000
    def __getitem__(self, k):
        if k >= 50:
            raise OSError(errno.ENOSPC, "No space left on device")
        return (k,)

try:
    CheckedDatasetWriter({str(tmp_path / "x.beton")!r}, {{"y": IntField()}}, num_workers=2).from_indexed_dataset(
        Failing(), chunksize=1)
except WorkerFailed as e:
    print("failed:", e)
    sys.exit(3)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "exited with code" in r.stdout, r.stderr[-1500:]
