"""The teacher cache at cluster scale: torchrun builds (2 gloo ranks, 2 "nodes") equal to a one-process build byte
for byte, a killed or signalled build completed by the same command, the size line and the refusal before any
forward, the size estimate against the bytes on disk, `--verify`."""
import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cache_teacher
from test_ddp import _env, _port, _why
from common.files import human
from training.cache_units import block_size, epoch_disk_bytes
from training.cli import run_main
from training.teacher_cache import CacheError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cache_worker.py")


def argv(demo_root, teacher_ckpt, out, *extra, epochs=2, topk=0):
    return ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "--out", str(out), "--epochs", str(epochs),
            "--precision", "fp16", "--topk", str(topk), "--no-eval", f"data.root={demo_root}", "data.subset=96",
            "pipeline.batch_size=32", "pipeline.num_workers=0", "run.progress=false", "run.amp=off",
            "run.device=cpu", "teacher.name=resnet8", f"teacher.ckpt={teacher_ckpt}", "run.dist_timeout_s=60",
            *extra]


def one_process(*args, **kw):
    """A build in this process on one thread, as each torchrun rank runs (thread counts may round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cache_teacher.main(argv(*args, **kw))
    finally:
        torch.set_num_threads(threads)


def launch(args, nodes=1, env=None, timeout=300):
    """torchrun over 2 processes: one node of 2, or 2 nodes of 1 meeting through a c10d rendezvous on localhost."""
    port, procs = _port(), []
    for node in range(nodes):
        where = ([f"--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}"] if nodes == 1 else
                 ["--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cache-test", f"--rdzv-conf=is_host={int(node == 0)}"])
        procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *where, WORKER, *args], cwd=ROOT,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(env)))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def same_epochs(a, b, epochs):
    for e in range(epochs):
        names = sorted(os.listdir(a / f"epoch_{e:04d}"))
        assert names == sorted(os.listdir(b / f"epoch_{e:04d}")) and "checksums.json" in names
        match, mismatch, errors = filecmp.cmpfiles(a / f"epoch_{e:04d}", b / f"epoch_{e:04d}", names, shallow=False)
        assert not mismatch and not errors, (e, mismatch, errors)


@pytest.fixture(scope="module")
def reference(demo_root, teacher_ckpt, tmp_path_factory):
    """One-process builds: a full 3-epoch cache and a top-3 1-epoch cache."""
    d = tmp_path_factory.mktemp("ref")
    one_process(demo_root, teacher_ckpt, d / "full", epochs=3)
    one_process(demo_root, teacher_ckpt, d / "top3", epochs=1, topk=3)
    return d


def test_torchrun_builds_equal_one_process_after_a_kill_a_sigterm_and_an_extension(demo_root, teacher_ckpt,
                                                                                   reference, tmp_path):
    out = tmp_path / "c"
    # 2 ranks, 2 epochs of 3 one-batch units: rank 1 is killed as it starts its second unit
    killed = launch(argv(demo_root, teacher_ckpt, out), env={"CRLD_TEST_RANK1_KILL_AT_UNIT": "2"})[0]
    assert killed.returncode != 0 and not (out / "meta.json").exists()
    again = launch(argv(demo_root, teacher_ckpt, out))[0]
    assert again.returncode == 0, _why(again)
    line = next(x for x in again.stdout.splitlines() if "to build:" in x)
    built, present = (int(x) for x in
                      line.split("to build: 2 epochs in ")[1].split(" present)")[0].split(" units ("))
    assert built + present == 6 and present >= 2, line  # only the missing units
    assert "per rank:" in again.stdout
    same_epochs(out, reference / "full", 2)
    # the extension to 3 epochs in parallel; rank 1 alone is signalled mid-unit: it finishes the unit, both stop
    cut = launch(argv(demo_root, teacher_ckpt, out, epochs=3), env={"CRLD_TEST_RANK1_SIGTERM_AT_BATCH": "1"})[0]
    assert cut.returncode != 0, _why(cut)
    assert "preempted: stopped by SIGTERM after 2 of 3 units" in cut.stderr and "(exit code 75)" in cut.stderr
    assert "preempted: stopped by a signal on another rank after 2 of 3 units" in cut.stderr, _why(cut)
    assert sorted(os.listdir(out / ".units")) == ["e0002_r0000000000-0000000032_b32",
                                                  "e0002_r0000000032-0000000064_b32"]
    marker = json.loads((out / "preempted.json").read_text())  # what a job script under torchrun tests
    assert marker["exit_code"] == 75 and "after 2 of 3 units" in marker["reason"], marker
    nodes = launch(argv(demo_root, teacher_ckpt, out, epochs=3), nodes=2)
    assert all(n.returncode == 0 for n in nodes), [_why(n) for n in nodes]
    assert "to build: 1 epochs in 1 units (2 present)" in nodes[0].stdout
    assert not (out / "preempted.json").exists()
    same_epochs(out, reference / "full", 3)
    assert not (out / ".units").exists() and not (out / ".build.json").exists()
    meta = cache_teacher.main(["--verify", str(out)])
    assert meta["epochs"] == 3 and meta["unchecked"] == []


def test_torchrun_top_k_build_equals_one_process(demo_root, teacher_ckpt, reference, tmp_path):
    r = launch(argv(demo_root, teacher_ckpt, tmp_path / "c", epochs=1, topk=3))[0]
    assert r.returncode == 0, _why(r)
    same_epochs(tmp_path / "c", reference / "top3", 1)


def test_size_line_estimate_and_refusal_before_any_forward(demo_root, teacher_ckpt, reference, tmp_path, capsys,
                                                           monkeypatch):
    for name, epochs, k in (("full", 3, 0), ("top3", 1, 3)):
        on_disk = sum(f.stat().st_size for f in (reference / name).glob("epoch_*/*"))
        assert on_disk == epochs * epoch_disk_bytes(96, 10, "fp16", k)
    monkeypatch.setattr(cache_teacher, "frozen_teacher", lambda *a: pytest.fail("the teacher was built"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    assert run_main(lambda: cache_teacher.main(argv(demo_root, teacher_ckpt, tmp_path / "c"))) == 2
    out, err = capsys.readouterr()
    per_epoch = epoch_disk_bytes(96, 10, "fp16", 0, block_size(tmp_path))
    assert (f"{human(per_epoch)} on disk per epoch (96 samples x 2 views, all 10 logits, fp16), {human(2 * per_epoch)} for 2 "
            f"epochs; to build: 2 epochs in 2 units (0 present)") in out and "1.0 MiB free on its file system" in out
    assert err.count("\n") == 1 and "not enough disk space: the cache needs 64.0 MiB more (2 epochs x " in err
    assert "its file system has 1.0 MiB free; 0 complete epochs kept" in err


def test_verify_names_a_flipped_byte_a_truncated_file_and_a_missing_epoch(reference, tmp_path, capsys):
    d = tmp_path / "c"
    shutil.copytree(reference / "full", d)
    assert run_main(lambda: cache_teacher.main(["--verify", str(d)])) == 0
    assert "ok, 3 epochs" in capsys.readouterr().out
    flipped = d / "epoch_0001" / "logits.npy"
    data = bytearray(flipped.read_bytes())
    data[1000] ^= 0x10
    flipped.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"epoch_0001/logits.npy: CRC-32 \w+, \w+ recorded when it was built"):
        cache_teacher.main(["--verify", str(d)])
    cut = d / "epoch_0000" / "logits.npy"
    cut.write_bytes(cut.read_bytes()[:-7])
    with pytest.raises(CacheError, match=r"epoch_0000/logits.npy: missing, truncated or corrupt cache file \(\d+ "
                                         r"bytes, its header promises \d+\)"):
        cache_teacher.main(["--verify", str(d)])
    shutil.rmtree(d / "epoch_0000")
    assert run_main(lambda: cache_teacher.main(["--verify", str(d)])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epoch_0000: missing (meta.json records 3 epochs)" in err


def test_bench_cache_reports_the_build_per_rank_and_aggregate(demo_root, tmp_path):
    from bench.__main__ import main as bench
    recs = bench(["cache", "--teacher", "resnet8", "--epochs", "1", "--batch-size", "32", "--image-size", "32",
                  "--device", "cpu", "--data", demo_root, "--workers", "0", "--cache-dir", str(tmp_path),
                  "--json", str(tmp_path / "b.json"), "data.subset=64"])
    assert len(recs) == 1 and recs[0]["world"] == 1 and recs[0]["num_samples"] == 64
    r = recs[0]
    # the rate is the build's samples over its seconds (rounded as recorded), and one rank's is the aggregate
    assert r["epochs"] == [0, 1] and r["units"] == 1
    low, high = r["seconds"] - 0.005, r["seconds"] + 0.005  # seconds are recorded to 2 decimals
    assert 64 / high <= r["samples_per_s"] + 0.05 and (low <= 0 or r["samples_per_s"] - 0.05 <= 64 / low), r
    assert len(r["per_rank_samples_per_s"]) == 1 and r["per_rank_samples_per_s"][0] >= r["samples_per_s"] * 0.98, r
    assert (tmp_path / "b.json").exists() and not (tmp_path / "cache").exists()
