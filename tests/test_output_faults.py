"""Output faults in one line with exit code 2: a full disk (mid-checkpoint: the previous last.pt stays), a run
directory under a regular file, a read-only cache directory, a report or metrics file that cannot be written.
A fault-injecting writer stands in for a full disk everywhere; a real small tmpfs and a read-only mount where
this process may mount (root), chmod elsewhere."""
import contextlib
import errno
import hashlib
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import cache_teacher
import eval as eval_cli
import report
from common.errors import OutputError
from common.files import atomic_folder, human, save_atomic, save_json_atomic
import train
from datasets_prep import make_cifar_like
from training.checkpoint import atomic_save, safe_load
from training.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
IN_THE_WAY = "is a file, not a folder; choose another output path"
SIZE = r"\d+(\.\d)? (B|KiB|MiB|GiB|TiB)"


def args(demo_root, out, *extra):
    return ["--config", os.path.join(ROOT, "configs/demo/ce.yaml"), f"data.root={demo_root}", f"run.out_dir={out}",
            "run.name=r", "data.subset=64", "pipeline.batch_size=32", "pipeline.num_workers=0", "optim.epochs=1",
            "optim.warmup_epochs=0", "run.progress=false", *extra]


def one_error_line(capsys, main) -> str:
    rc = run_main(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def digest(folder) -> dict:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder))}


def free_bytes(n):
    return lambda p: shutil._ntuple_diskusage(1 << 40, (1 << 40) - n, n)


@contextlib.contextmanager
def mounted(path, options):
    """A tmpfs at `path` with `options`; skips where this process cannot mount (not root)."""
    path.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@contextlib.contextmanager
def read_only_dir(path):
    """An empty folder this process cannot write to: a read-only tmpfs as root (who ignores mode bits), else
    mode 0555."""
    if os.geteuid() == 0:
        with mounted(path, "ro,size=64k") as p:
            yield p
        return
    path.mkdir()
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


# ---- the writers ---------------------------------------------------------------------------------
def test_a_full_disk_names_the_file_its_size_and_the_free_space(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"previous")
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(3 * 1024))

    def fill(f):
        f.write(b"x" * 1000)
        raise ENOSPC
    with pytest.raises(OutputError) as e:
        save_atomic(str(path), fill, need=1536 * 1024)
    assert str(e.value) == (f"cannot write {path}: no space left on its file system (needs 1.5 MiB, 3.0 KiB free); "
                            f"free some space or write elsewhere")
    assert os.listdir(tmp_path) == ["f.bin"] and path.read_bytes() == b"previous"
    assert human(100) == "100 B" and human(5 << 30) == "5.0 GiB"


def test_a_checkpoint_that_does_not_fit_counts_its_tensors(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_save({"w": torch.zeros(10)}, path)

    def half_then_full(obj, f):
        f.write(b"PK" * 100)
        raise ENOSPC
    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OutputError, match=r"last\.pt: no space left on its file system \(needs 4\.0 MiB, "):
        atomic_save({"w": torch.zeros(1 << 20), "step": 3}, path)
    assert os.listdir(tmp_path) == ["last.pt"] and safe_load(path)["w"].shape == (10,)


def test_a_folder_writer_turns_output_faults_into_one_line_and_leaves_read_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="no space left"):
        with atomic_folder(str(out)) as tmp:
            np.save(os.path.join(tmp, "a.npy"), np.zeros(3))
            raise ENOSPC
    with pytest.raises(FileNotFoundError):  # reading a source is not an output fault
        with atomic_folder(str(out)):
            open(tmp_path / "missing")
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path}/file/d/x: {tmp_path}/file is a file, not a folder"):
        save_json_atomic(str(tmp_path / "file" / "d" / "x"), {})


# ---- train.py ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_epoch(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    train.main(args(demo_root, out))
    return out / "r"


def test_a_full_disk_mid_checkpoint_is_one_line_and_keeps_the_previous_last_pt(demo_root, one_epoch, tmp_path,
                                                                               capsys, monkeypatch):
    shutil.copytree(one_epoch, tmp_path / "r")
    before = digest(tmp_path / "r")
    real_save = torch.save

    class FillsUp:
        """The checkpoint's file on a disk that fills after 16 KiB (torch's zip writer then fails as it closes)."""
        def __init__(self, f):
            self.f, self.left = f, 16 << 10

        def write(self, b):
            n = memoryview(b).nbytes
            if n > self.left:
                raise ENOSPC
            self.left -= n
            return self.f.write(b)

        def flush(self):
            self.f.flush()
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FillsUp(f)))
    line = one_error_line(capsys, lambda: train.main(args(demo_root, tmp_path, "optim.epochs=2", "--resume")))
    assert re.fullmatch(rf"error: cannot write {re.escape(str(tmp_path))}/r/(best|last)\.pt: no space left on its "
                        rf"file system \(needs {SIZE}, {SIZE} free\); free some space or write elsewhere", line), line
    after = digest(tmp_path / "r")
    assert {k: after[k] for k in ("best.pt", "last.pt")} == {k: before[k] for k in ("best.pt", "last.pt")}
    assert not [f for f in after if "tmp" in f]
    monkeypatch.undo()
    assert safe_load(str(tmp_path / "r" / "last.pt"))["epoch"] == 1


def test_a_real_full_disk_mid_checkpoint(demo_root, one_epoch, tmp_path, capsys):
    """The run folder on a tmpfs with 64 KiB left: the second epoch's checkpoint cannot fit beside the first."""
    used = sum(os.path.getsize(os.path.join(one_epoch, f)) for f in os.listdir(one_epoch))
    with mounted(tmp_path / "small", f"size={(used >> 10) + 64 + 16}k") as mnt:
        shutil.copytree(one_epoch, mnt / "r")
        before = digest(mnt / "r")
        line = one_error_line(capsys, lambda: train.main(args(demo_root, mnt, "optim.epochs=2", "--resume")))
        assert re.match(rf"error: cannot write {re.escape(str(mnt))}/r/(best|last)\.pt: no space left on its "
                        rf"file system \(needs {SIZE}, {SIZE} free\)", line), line
        after = digest(mnt / "r")
        assert after["last.pt"] == before["last.pt"] and not [f for f in after if "tmp" in f]


def test_a_run_folder_under_a_regular_file_is_one_line(demo_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = one_error_line(capsys, lambda: train.main(args(demo_root, blocker / "runs")))
    assert line == f"error: cannot write {blocker}/runs/r: {blocker} {IN_THE_WAY}"
    assert os.listdir(tmp_path) == ["file"] and blocker.read_text() == "not a folder"


def test_a_read_only_run_folder_is_one_line(demo_root, tmp_path, capsys):
    with read_only_dir(tmp_path / "ro") as ro:
        line = one_error_line(capsys, lambda: train.main(args(demo_root, ro / "runs")))
    assert line.startswith(f"error: cannot write {ro}/runs/r: ") and ("read-only" in line or "permission" in line)


def test_metrics_that_cannot_be_appended_are_one_line(demo_root, tmp_path, capsys, monkeypatch):
    import training.student as student
    real_open = open

    def full_for_metrics(path, mode="r", *a, **kw):
        if str(path).endswith("metrics.jsonl"):
            raise ENOSPC
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(student, "open", full_for_metrics, raising=False)
    line = one_error_line(capsys, lambda: train.main(args(demo_root, tmp_path)))
    assert re.fullmatch(rf"error: cannot write {re.escape(str(tmp_path))}/r/metrics\.jsonl: no space left on its "
                        rf"file system \(needs \d+ B, {SIZE} free\); free some space or write elsewhere", line), line


# ---- the other entry points ----------------------------------------------------------------------
def test_a_read_only_cache_folder_is_one_line_before_the_teacher_runs(demo_root, teacher_ckpt, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(cache_teacher, "open_split", lambda *a, **k: pytest.fail("the data was opened"))
    argv = ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "--epochs", "1", f"data.root={demo_root}",
            f"teacher.ckpt={teacher_ckpt}", "teacher.name=resnet8", "run.device=cpu"]
    with read_only_dir(tmp_path / "ro") as ro:
        line = one_error_line(capsys, lambda: cache_teacher.main(argv + ["--out", str(ro)]))
        assert line.startswith(f"error: cannot write {ro}: ") and ("read-only" in line or "permission" in line)
        assert os.listdir(ro) == []
    (tmp_path / "file").write_text("x")
    line = one_error_line(capsys, lambda: cache_teacher.main(argv + ["--out", str(tmp_path / "file")]))
    assert line == f"error: cannot write {tmp_path}/file: {tmp_path}/file {IN_THE_WAY}"


@pytest.mark.parametrize("tool", ["report", "eval", "make_cifar_like"])
def test_outputs_under_a_regular_file_are_one_line(tool, demo_root, teacher_ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"
    main = {"report": lambda: report.main([str(tmp_path), "--out", str(out)]),
            "eval": lambda: eval_cli.main(["--config", os.path.join(ROOT, "configs/demo/ce.yaml"), "--ckpt",
                                           teacher_ckpt, f"data.root={demo_root}", "--json", str(out)]),
            "make_cifar_like": lambda: make_cifar_like.main(["--out", str(out), "--train", "10", "--test", "10"])}
    line = one_error_line(capsys, main[tool])
    assert line.startswith(f"error: cannot write {out}") and line.endswith(
        f": {blocker} {IN_THE_WAY}"), line
    assert os.listdir(tmp_path) == ["file"]
