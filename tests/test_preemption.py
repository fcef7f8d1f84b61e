"""Preemption: SIGTERM / SIGUSR1 stop the run at a step boundary with a checkpoint there and exit code 75; a
kill -9 after a mid-epoch checkpoint; in both cases --resume ends with the weights of an uninterrupted run,
for every backend and with the teacher cache. TensorBoard events hold metrics.jsonl's scalars."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cache_teacher
import train
from pipelines import available_pipelines
from training.checkpoint import safe_load
from training.cli import run_main
from training.preemption import EXIT_PREEMPTED
from training.student import Student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = [p for p in ("torch", "gpu", "dali", "ffcv") if p in available_pipelines()]


@pytest.fixture(scope="module")
def data(demo_cut):
    return demo_cut(96, 64, betons="ffcv" in PIPELINES)  # 3 steps of 32 per epoch


def args(root, teacher, out, name, *extra):
    return ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), f"data.root={root}", f"run.out_dir={out}",
            f"run.name={name}", "pipeline.batch_size=32", "pipeline.val_batch_size=64", "pipeline.num_workers=0",
            "optim.epochs=2", "optim.warmup_epochs=0", "run.progress=false", "model.name=resnet8",
            "teacher.name=resnet8", f"teacher.ckpt={teacher}", "run.deterministic=true", "run.log_every=2", *extra]


def signal_at(monkeypatch, step, sig=signal.SIGTERM):
    """The process signals itself once right after training step `step` (as a cluster would, mid-step)."""
    real, sent = Student.train_step, []

    def hooked(self, *a, **k):
        out = real(self, *a, **k)
        if self.step == step and not sent:  # once: in a group every student reaches the step
            sent.append(os.kill(os.getpid(), sig))
        return out
    monkeypatch.setattr(Student, "train_step", hooked)


def assert_same_run(a, b):
    wa, wb = safe_load(os.path.join(a, "last.pt")), safe_load(os.path.join(b, "last.pt"))
    assert wa["epoch"] == wb["epoch"] == 2 and wa["step"] == wb["step"]
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    la, lb = ([json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))] for d in (a, b))
    assert [x["train_loss"] for x in la] == [x["train_loss"] for x in lb]  # the epoch's sums survive too


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(data, teacher_ckpt, tmp_path, monkeypatch, capsys,
                                                                    pipeline):
    common = ("--pipeline", pipeline)
    train.main(args(data, teacher_ckpt, tmp_path, "full", *common))
    with monkeypatch.context() as m:
        signal_at(m, 4)  # epoch 2, after its first step
        assert run_main(lambda: train.main(args(data, teacher_ckpt, tmp_path, "cut", *common))) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert "preempted: stopped by SIGTERM after step 1 of epoch 2" in err
    ck = safe_load(str(tmp_path / "cut" / "last.pt"))
    assert (ck["epoch"], ck["step"]) == (1, 4) and not any(".tmp" in f for f in os.listdir(tmp_path / "cut"))
    marker = tmp_path / "cut" / "preempted.json"
    assert "SIGTERM after step 1 of epoch 2" in json.loads(marker.read_text())["reason"]
    train.main(args(data, teacher_ckpt, tmp_path, "cut", *common, "--resume"))
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    assert not marker.exists() and not (tmp_path / "full" / "preempted.json").exists()


@pytest.fixture(scope="module")
def cache(data, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "fp32"
    cache_teacher.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "--out", str(out), "--epochs", "2",
                        "--precision", "fp32", "--no-eval", *args(data, teacher_ckpt, out.parent, "x")[2:]])
    return out


def test_sigusr1_in_a_group_with_the_cache_then_resume(data, teacher_ckpt, cache, tmp_path, monkeypatch):
    common = ("teacher.source=cache", f"teacher.cache={cache}", "--student", "method.name=kd")
    train.main(args(data, teacher_ckpt, tmp_path, "full", *common))
    with monkeypatch.context() as m:
        signal_at(m, 2, signal.SIGUSR1)  # epoch 1, mid-way
        assert run_main(lambda: train.main(args(data, teacher_ckpt, tmp_path, "cut", *common))) == EXIT_PREEMPTED
    train.main(args(data, teacher_ckpt, tmp_path, "cut", *common, "--resume"))
    for k in (0, 1):
        assert_same_run(tmp_path / "full" / f"student{k}", tmp_path / "cut" / f"student{k}")


def _worker(argv, env):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "train_worker.py"), *argv], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("pipeline", PIPELINES + ["torch+cache"])
def test_kill_9_after_a_mid_epoch_checkpoint_then_resume(data, teacher_ckpt, cache, tmp_path, pipeline):
    """run.save_every_min makes checkpoints mid-epoch (here at every logging sync); SIGKILL lands after one."""
    common = ("run.save_every_min=0.00001", "run.log_every=1", "--pipeline", pipeline.split("+")[0],
              *(["teacher.source=cache", f"teacher.cache={cache}"] if pipeline.endswith("+cache") else []))
    for name, env, code in (("full", {}, 0), ("cut", {"CRLD_TEST_KILL_AT_STEP": "5"}, -signal.SIGKILL)):
        p = _worker(args(data, teacher_ckpt, tmp_path, name, *common), env)  # all three runs: one process each
        assert p.communicate(timeout=600) and p.returncode == code
    assert safe_load(str(tmp_path / "cut" / "last.pt"))["step"] == 5  # written right before the kill
    p = _worker(args(data, teacher_ckpt, tmp_path, "cut", *common, "--resume"), {})
    assert p.communicate(timeout=600) and p.returncode == 0
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_sigterm_stops_after_the_step_in_flight_with_a_checkpoint_and_a_second_signal_at_once(data, teacher_ckpt,
                                                                                              tmp_path):
    def started(name, slow_s, step, *extra):
        """(a run whose steps take slow_s seconds each, the step it is in) once it is in (or past) step `step`."""
        marker = tmp_path / f"{name}.step"
        p = _worker(args(data, teacher_ckpt, tmp_path, name, "optim.epochs=50", *extra),
                    {"CRLD_TEST_SLOW_STEP_S": str(slow_s), "CRLD_TEST_STEP_FILE": str(marker)})
        deadline, at = time.time() + 300, -1
        while at < step:
            assert time.time() < deadline and p.poll() is None  # a hang guard
            time.sleep(0.1)
            at = int(marker.read_text() or -1) if marker.exists() else -1
        return p, at
    p, at = started("one", 0.5, 4, "pipeline.num_workers=1")  # epoch 2, mid-step; a loader worker process to end
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED and "preempted: stopped by SIGTERM" in err, err[-800:]
    ck = safe_load(str(tmp_path / "one" / "last.pt"))
    # a whole checkpoint after the step the signal landed in (or one begun meanwhile), not at the run's end (150)
    assert at + 1 <= ck["step"] <= at + 3 and ck["model"], (at, ck["step"])
    p, _ = started("two", 30, 0)
    p.send_signal(signal.SIGTERM)
    time.sleep(1)
    p.send_signal(signal.SIGTERM)  # the step still has ~30 s to go: the second signal does not wait for it
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGTERM  # killed by the signal: the graceful stop would exit 75 after the step


def test_tensorboard_events_hold_the_jsonl_scalars(data, teacher_ckpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.main(args(data, teacher_ckpt, tmp_path, "tb", "run.tensorboard=true", "--student", "method.name=ce"))
    for k, parts in ((0, ("ce", "kd_wv", "kd_cv", "mask_w_rate")), (1, ())):
        acc = EventAccumulator(str(tmp_path / "tb" / f"student{k}" / "tensorboard"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train/loss", "train/top1", "val/top1", "val/top5", "val/loss", "run/lr", "run/samples_per_s",
                "run/data_wait_frac"} | {f"train/{p}" for p in parts} <= tags, tags
        jsonl = [json.loads(x) for x in open(tmp_path / "tb" / f"student{k}" / "metrics.jsonl")]
        assert [e.value for e in acc.Scalars("val/top1")] == pytest.approx([x["val_top1"] for x in jsonl])
        assert [e.step for e in acc.Scalars("val/top1")] == [1, 2]
    train.main(args(data, teacher_ckpt, tmp_path, "off"))
    assert not os.path.exists(tmp_path / "off" / "tensorboard")
