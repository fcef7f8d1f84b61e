"""torchrun + DDP on CPU (gloo): a 2-rank run equals a 1-process run with the same global batch;
resume under DDP; the start-up checks (batch vs ranks, config agreement)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import cache_teacher
from common.errors import RuntimeConfigError
import train
from training.config import load_config
from training.runtime import Dist, check_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")


def _why(r):
    """A failed launch's report: the ranks' own output (a traceback, faulthandler's stack) comes before
    torchrun's summary, so both ends are shown."""
    return r.stderr if len(r.stderr) < 6000 else r.stderr[:4500] + "\n[...]\n" + r.stderr[-1500:]


def _env(extra=None):
    """One thread per rank (two ranks share two cores) and faulthandler on in every rank, so a rank that aborts
    (SIGABRT at exit has been seen, rarely) prints every thread's Python stack into the test's report."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(extra or {})}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher_ckpt(random_teacher):
    return random_teacher("resnet14", seed=3)


def _argv(demo_root, teacher_ckpt, out, *extra):
    return ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), f"data.root={demo_root}", f"run.out_dir={out}",
            "run.name=r", "data.subset=128", "pipeline.batch_size=32", "pipeline.val_batch_size=64",
            "pipeline.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "run.progress=false",
            "model.name=resnet8_gn", "teacher.name=resnet14", f"teacher.ckpt={teacher_ckpt}", "run.device=cpu",
            "run.log_every=2", "optim.lr=0.01", *extra]


def run(nproc, demo_root, teacher_ckpt, out, *extra, env=None, timeout=400):
    argv = _argv(demo_root, teacher_ckpt, out, *extra)
    launch = [sys.executable, WORKER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={_port()}", WORKER]
    env = _env(env)
    return subprocess.run(launch + argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def one_process(demo_root, teacher_ckpt, tmp_path_factory):
    """The output folder of the 1-process run (`run`'s defaults) the 2-rank runs are compared with, run once."""
    out = tmp_path_factory.mktemp("one")
    r = run(1, demo_root, teacher_ckpt, out)
    assert r.returncode == 0, _why(r)
    return out


def _metrics(out, student=""):
    return [json.loads(x) for x in open(os.path.join(out, "r", student, "metrics.jsonl"))]


def test_two_ranks_match_one_process(demo_root, teacher_ckpt, one_process, tmp_path):
    two = run(2, demo_root, teacher_ckpt, tmp_path / "two")
    assert two.returncode == 0, _why(two)
    a, b = _metrics(one_process), _metrics(tmp_path / "two")
    assert [m["world"] for m in b] == [2, 2]
    for x, y in zip(a, b):
        for k in ("train_loss", "train_ce", "train_kd_wv", "train_kd_cv", "train_top1", "val_loss"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k
        assert y["val_top1"] == pytest.approx(x["val_top1"], abs=1e-6)
    wa = torch.load(one_process / "r" / "last.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "two" / "r" / "last.pt", weights_only=False)["model"]
    # The bound sits between float noise (reduction order; a 1-process run with 2 threads instead of 1 stays
    # below it) and a sharding or averaging bug (a half-size batch lands far above); docs/benchmarks.md has
    # the measured distances.
    for k, v in wa.items():
        if v.is_floating_point():
            rel = ((wb[k] - v).norm() / v.norm().clamp_min(1e-12)).item()
            assert rel < 1e-3, (k, rel)
        else:
            assert torch.equal(wb[k], v), k
    # only rank 0 wrote: one metrics file with one line per epoch
    assert len(b) == 2 and sorted(os.listdir(tmp_path / "two" / "r")) == sorted(os.listdir(one_process / "r"))


def test_resume_under_ddp(demo_root, teacher_ckpt, tmp_path):
    first = run(2, demo_root, teacher_ckpt, tmp_path, "optim.epochs=2", env={"CRLD_TEST_KILL_AFTER_EPOCH": "1"})
    assert first.returncode != 0 and len(_metrics(tmp_path)) == 1
    again = run(2, demo_root, teacher_ckpt, tmp_path, "--resume")
    assert again.returncode == 0, _why(again)
    assert [m["epoch"] for m in _metrics(tmp_path)] == [1, 2]


def run_two_nodes(demo_root, teacher_ckpt, out, *extra, env=None, timeout=400):
    """Two torchrun "nodes" on this machine, one gloo process each, meeting through a c10d rendezvous on
    localhost (node 0 hosts it): the launch of a multi-node job."""
    port, procs = _port(), []
    for node in (0, 1):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                  "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                  "--rdzv-id=crld-test", f"--rdzv-conf=is_host={int(node == 0)}", WORKER]
        procs.append(subprocess.Popen(launch + _argv(demo_root, teacher_ckpt, out, *extra), cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=_env(env)))
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def test_two_nodes_match_one_process_write_once_and_resume(demo_root, teacher_ckpt, one_process, tmp_path):
    nodes = run_two_nodes(demo_root, teacher_ckpt, tmp_path / "two")
    assert all(n.returncode == 0 for n in nodes), [n.stderr[-1500:] for n in nodes]
    a, b = _metrics(one_process), _metrics(tmp_path / "two")
    assert [m["world"] for m in b] == [2, 2]  # one line per epoch: rank 0 alone wrote
    for x, y in zip(a, b):
        for k in ("train_loss", "train_top1", "val_loss"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k
    assert sorted(os.listdir(tmp_path / "two" / "r")) == sorted(os.listdir(one_process / "r"))
    killed = run_two_nodes(demo_root, teacher_ckpt, tmp_path / "k", "run.dist_timeout_s=60",
                           env={"CRLD_TEST_KILL_AFTER_EPOCH": "1"})
    assert all(n.returncode != 0 for n in killed) and len(_metrics(tmp_path / "k")) == 1
    again = run_two_nodes(demo_root, teacher_ckpt, tmp_path / "k", "--resume")
    assert all(n.returncode == 0 for n in again), [n.stderr[-1500:] for n in again]
    assert [m["epoch"] for m in _metrics(tmp_path / "k")] == [1, 2]
    wa = torch.load(one_process / "r" / "last.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "k" / "r" / "last.pt", weights_only=False)["model"]
    assert all(((wb[k] - v).norm() / v.norm().clamp_min(1e-12)).item() < 1e-3 for k, v in wa.items()
               if v.is_floating_point())


def test_a_group_on_two_ranks_matches_one_process(demo_root, teacher_ckpt, tmp_path):
    """Each student of a group is its own DDP module: 2 ranks train every student as 1 process does."""
    group = ["--student", "method.name=kd", "--student", "method.name=ce model.init_seed=4"]
    one = run(1, demo_root, teacher_ckpt, tmp_path / "one", *group)
    two = run(2, demo_root, teacher_ckpt, tmp_path / "two", *group)
    assert one.returncode == 0, _why(one)
    assert two.returncode == 0, _why(two)
    for k in range(3):
        a, b = (_metrics(out, f"student{k}") for out in (tmp_path / "one", tmp_path / "two"))
        assert [m["world"] for m in b] == [2, 2]
        for x, y in zip(a, b):
            for key in ("train_loss", "train_top1", "val_loss"):
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (k, key)
    assert sorted(os.listdir(tmp_path / "two" / "r")) == ["group.json", "student0", "student1", "student2"]


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_resumes(demo_root, teacher_ckpt, one_process,
                                                                            tmp_path):
    """Rank 1 alone is signalled after step 5 (mid epoch 2, run.log_every=2): the ranks agree at the next logging
    sync (step 6), rank 0 writes last.pt there, both exit 75; --resume ends as the 1-process run does."""
    cut = run(2, demo_root, teacher_ckpt, tmp_path, "run.dist_timeout_s=60",
              env={"CRLD_TEST_RANK1_SIGTERM_AT_STEP": "5"})
    assert cut.returncode != 0 and cut.stderr.count("preempted: stopped by a signal on another rank after step 2 "
                                                   "of epoch 2") == 1, cut.stderr[-3000:]
    assert "preempted: stopped by SIGTERM after step 2 of epoch 2" in cut.stderr
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=False)["step"] == 6
    again = run(2, demo_root, teacher_ckpt, tmp_path, "--resume")
    assert again.returncode == 0, _why(again)
    for x, y in zip(_metrics(one_process), _metrics(tmp_path)):
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4, abs=1e-6)


def test_sigterm_to_the_torchrun_agent_checkpoints_every_rank_and_resumes(demo_root, teacher_ckpt, one_process,
                                                                         tmp_path):
    """SLURM or Kubernetes may signal torchrun itself: it forwards SIGTERM to its workers, which stop at the next
    logging sync with last.pt there (torchrun then exits 1, not 75: preempted.json tells the job script)."""
    step_file = tmp_path / "step"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={_port()}", WORKER]
    env = _env({"CRLD_TEST_SLOW_STEP_S": "0.5", "CRLD_TEST_STEP_FILE": str(step_file)})
    p = subprocess.Popen(launch + _argv(demo_root, teacher_ckpt, tmp_path, "run.dist_timeout_s=60"), cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        if step_file.exists() and step_file.read_text().strip() not in ("", "0", "1", "2", "3", "4"):
            break  # a step of epoch 2 (4 steps per epoch) has begun
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode not in (0, None) and err.count("preempted: stopped by SIGTERM after step") == 2, err[-3000:]
    step = torch.load(tmp_path / "r" / "last.pt", weights_only=False)["step"]
    assert 4 < step < 8 and step % 2 == 0, step  # mid epoch 2, at a logging sync (run.log_every=2)
    assert "after step" in json.loads((tmp_path / "r" / "preempted.json").read_text())["reason"]
    again = run(2, demo_root, teacher_ckpt, tmp_path, "--resume")
    assert again.returncode == 0, _why(again)
    assert not (tmp_path / "r" / "preempted.json").exists()
    for x, y in zip(_metrics(one_process), _metrics(tmp_path)):
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4, abs=1e-6)


def test_more_ranks_than_batch_and_uneven_batch(monkeypatch):
    # check_world needs only the batch size and the world, so no ranks are launched: a RuntimeConfigError raised
    # under torchrun reaching stderr and the exit status is test_config_differing_between_ranks_is_detected's part
    def check(batch):
        check_world(load_config(None, [f"pipeline.batch_size={batch}"]), Dist(world=3))
    with pytest.raises(RuntimeConfigError, match=re.escape("pipeline.batch_size=2 is smaller than the 3 ranks")):
        check(2)
    with pytest.raises(RuntimeConfigError, match="not divisible by the 3 ranks"):
        check(32)
    check(33)
    # train.py takes the world from torchrun's environment and checks it before joining the process group
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeConfigError, match="not divisible by the 3 ranks"):
        train.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "pipeline.batch_size=32"])


def test_config_differing_between_ranks_is_detected(demo_root, teacher_ckpt, tmp_path):
    # a per-node environment difference: rank 1 resolves another learning rate
    r = run(2, demo_root, teacher_ckpt, tmp_path, env={"CRLD_TEST_RANK1_OVERRIDE": "optim.lr=0.2"})
    assert r.returncode != 0 and "the resolved config differs between ranks (rank 0 vs ranks [1])" in r.stderr
    # each rank raises right after the collective that compared the configs: it exits with its error, never
    # aborts while gloo's thread releases that collective (training.runtime.let_backend_threads_settle)
    assert "SIGABRT" not in r.stderr and "terminate called" not in r.stderr, _why(r)


def test_two_ranks_read_their_own_cache_rows(demo_root, teacher_ckpt, one_process, tmp_path):
    import train_worker  # noqa: F401  (registers resnet8_gn for config validation; tests/ is on pytest's path)
    common = [f"data.root={demo_root}", "data.subset=128", "pipeline.batch_size=32", "pipeline.num_workers=0",
              "run.progress=false", "model.name=resnet8_gn", "teacher.name=resnet14", f"teacher.ckpt={teacher_ckpt}",
              "run.device=cpu", "run.amp=off"]
    cache_teacher.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "--out", str(tmp_path / "cache"),
                        "--epochs", "2", "--precision", "fp32", "--no-eval", *common])
    two = run(2, demo_root, teacher_ckpt, tmp_path / "two", "teacher.source=cache",
              f"teacher.cache={tmp_path / 'cache'}")
    assert two.returncode == 0, _why(two)
    for x, y in zip(_metrics(one_process), _metrics(tmp_path / "two")):
        for k in ("train_loss", "train_kd_wv", "train_kd_cv", "val_loss"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k


def test_a_rank_dying_mid_epoch_stops_the_run(demo_root, teacher_ckpt, tmp_path):
    # torchrun tears the survivors down and names the failed rank: the run ends long before the collective
    # timeout (run.dist_timeout_s, 600 s by default) would end it, within the hang guard
    r = run(2, demo_root, teacher_ckpt, tmp_path, env={"CRLD_TEST_RANK1_DIES_AT_STEP": "2"}, timeout=300)
    assert r.returncode != 0 and "rank      : 1" in r.stderr and "exitcode  : 1" in r.stderr
    assert not os.path.exists(tmp_path / "r" / "last.pt")


def test_a_non_finite_loss_on_one_rank_stops_every_rank(demo_root, teacher_ckpt, tmp_path):
    """Rank 1's loss turns NaN at the step before a check while rank 0's stays finite: both stop there,
    with the reason, rather than rank 0 waiting in the next step's all-reduce."""
    r = run(2, demo_root, teacher_ckpt, tmp_path, "optim.epochs=1", "run.dist_timeout_s=60",
            env={"CRLD_TEST_RANK1_NAN_AT_STEP": "1"}, timeout=300)
    assert r.returncode != 0
    msg = "non-finite loss in steps 0-1 (epoch 1) in component(s): loss, kd_cv"
    assert (r.stdout + r.stderr).count(msg) == 2, (r.stdout + r.stderr)[-3000:]


def test_bench_step_under_torchrun_reports_ranks_and_aggregate(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_port()}", "-m", "bench", "step", "--teacher", "resnet14",
                        "--student", "resnet8", "--num-classes", "10", "--image-size", "16", "--batch-size", "8",
                        "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_env())
    assert r.returncode == 0, _why(r)
    recs = json.load(open(out))
    assert [x["world"] for x in recs] == [2, 2, 2] and "2 rank(s)" in r.stdout
    for x in recs:
        assert len(x["per_rank_samples_per_s"]) == 2
        assert x["samples_per_s"] == pytest.approx(sum(x["per_rank_samples_per_s"]))


RAISE_AFTER_COLLECTIVE = """
import os, torch
from training.runtime import Dist, init_distributed
d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 0)
init_distributed(d, torch.device("cpu"), 60)
torch.distributed.all_gather_object([None] * d.world, d.rank)
raise SystemExit(f"rank {d.rank} stops right after the collective")
"""


def test_a_rank_exiting_right_after_a_collective_does_not_abort():
    """The interpreter finalizing while gloo's worker thread still releases the collective's tensors aborted such
    a rank (SIGABRT) in about half of the launches; three launches, each rank must exit with its own message."""
    for _ in range(3):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_addr=127.0.0.1", f"--master_port={_port()}", "--no-python", sys.executable,
                            "-c", RAISE_AFTER_COLLECTIVE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=_env({"PYTHONPATH": ROOT}))
        assert r.returncode != 0 and "stops right after the collective" in r.stderr, _why(r)
        assert "SIGABRT" not in r.stderr and "terminate called" not in r.stderr, _why(r)
