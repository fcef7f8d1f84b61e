"""End to end on CPU: every method, checkpoints, kill-and-resume, and bad input at the CLI."""
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from training.checkpoint import load_model_weights, safe_load
from training.cli import run_main
from training.loop import NonFiniteLoss
from training.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def right_of(top1, n):
    """top1 (%) is k of the n validation images right, 0 <= k <= n: an accuracy averaged over unequal batches, or
    counting a padded batch's repeats, is not."""
    k = top1 * n / 100
    return abs(k - round(k)) < 1e-6 and 0 <= round(k) <= n


def args(demo_root, out, name, *extra):
    return ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), f"data.root={demo_root}",
            f"run.out_dir={out}", f"run.name={name}", "data.subset=128", "pipeline.batch_size=32",
            "pipeline.val_batch_size=128", "pipeline.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0",
            "run.progress=false", "model.name=resnet8", "teacher.name=resnet8", *extra]


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "crld"])
def test_two_epoch_run_of_each_method(demo_root, teacher_ckpt, tmp_path, method):
    summary = train.main(args(demo_root, tmp_path, method, f"method.name={method}", f"teacher.ckpt={teacher_ckpt}"))
    run = tmp_path / method
    lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(x["train_loss"])) for x in lines)
    if method == "crld":
        assert {"train_ce", "train_kd_wv", "train_kd_cv", "train_mask_w_rate"} <= set(lines[0])
    assert summary["epochs"] == 2 and summary["best_top1"] == max(x["val_top1"] for x in lines)
    assert right_of(summary["best_top1"], 360)
    assert json.load(open(run / "summary.json"))["best_top1"] == summary["best_top1"]
    assert "method:\n  name: " + method in open(run / "config.yaml").read()
    info = json.load(open(run / "run_info.json"))
    assert len(info["commit"]) == 40 or info["commit"] == "unknown"
    m = create_model("resnet8", 10)
    load_model_weights(m, str(run / "best.pt"))
    ck = safe_load(str(run / "last.pt"))
    assert ck["epoch"] == 2 and ck["step"] == 2 * 4
    assert not any(f.endswith(".tmp") or ".tmp." in f for f in os.listdir(run))
    # the weights moved away from initialisation
    torch.manual_seed(0)
    init = create_model("resnet8", 10).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in ck["model"].items() if v.is_floating_point())


def _cli(argv, env=None, program="train.py"):
    return subprocess.run([sys.executable, os.path.join(ROOT, program), *argv], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_kill_and_resume_matches_uninterrupted_run(demo_root, teacher_ckpt, tmp_path):
    common = [f"teacher.ckpt={teacher_ckpt}", "optim.epochs=3", "run.deterministic=true"]
    full = _cli(args(demo_root, tmp_path, "full", *common))
    assert full.returncode == 0, full.stderr
    # killed with SIGKILL right after epoch 1's checkpoint
    killed = _cli(args(demo_root, tmp_path, "killed", *common), env={"CRLD_TEST_KILL_AFTER_EPOCH": "1"},
                  program="tests/train_worker.py")
    assert killed.returncode == -signal.SIGKILL
    assert len(open(tmp_path / "killed" / "metrics.jsonl").readlines()) == 1
    resumed = _cli(args(demo_root, tmp_path, "killed", *common) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = safe_load(str(tmp_path / "full" / "last.pt"))
    b = safe_load(str(tmp_path / "killed" / "last.pt"))
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [json.loads(x)["train_loss"] for x in open(tmp_path / "full" / "metrics.jsonl")]
    lb = [json.loads(x)["train_loss"] for x in open(tmp_path / "killed" / "metrics.jsonl")]
    assert la == lb


def test_non_finite_loss_names_step_and_component(demo_root, teacher_ckpt, tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step \d+ \(epoch 1\) in component\(s\): .*loss"):
        train.main(args(demo_root, tmp_path, "nan", f"teacher.ckpt={teacher_ckpt}", "optim.lr=1e30",
                        "run.log_every=1", "optim.epochs=1"))


@pytest.fixture
def train_in_process(monkeypatch, capfd):
    """train_in_process(argv) -> (exit code, stderr): `python train.py argv` run in this process (no interpreter
    and torch start-up), through the same `run_main`. What a run changes process-wide is put back afterwards:
    environment variables, working directory, logging's root handlers and level, the RNGs and torch's global
    switches (`seed_everything` sets cudnn.benchmark, TF32 and deterministic algorithms)."""
    monkeypatch.chdir(ROOT)  # where `_cli` runs train.py
    monkeypatch.setenv("CRLD_KEEP_FREED_MEMORY", "0")  # no mallopt: it would hold the test process's peak heap
    monkeypatch.delenv("CRLD_TRACEBACK", raising=False)
    env, root = dict(os.environ), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    switches = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())

    def run(argv):
        capfd.readouterr()
        rc = run_main(lambda: train.main(argv))
        return rc, capfd.readouterr().err

    yield run
    for k in set(os.environ) - set(env):
        del os.environ[k]
    os.environ.update(env)
    root.handlers[:] = handlers
    root.setLevel(level)
    torch.set_rng_state(rngs[0])
    random.setstate(rngs[1])
    np.random.set_state(rngs[2])
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
     deterministic, warn_only, threads) = switches
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
            deterministic, warn_only):  # only when changed: the call imports torch._inductor (seconds)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)


def assert_one_error_line(returncode, stderr, pattern):
    assert returncode == 2, stderr
    err = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    assert re.search(pattern, err[0]), err[0]


BAD_INPUT = [
    (["--resume"], r"--resume: no checkpoint at .*last.pt"),
    (["data.root=/nonexistent/data"], r"data.root '/nonexistent/data' does not exist"),
    (["optim.lrr=1"], r"unknown config key 'optim.lrr'.*'optim.lr'"),
    (["teacher.name=resnet20"], r"does not fit ResNet .*shape mismatches|does not fit ResNet"),
    (["teacher.ckpt="], r"teacher.ckpt is required for method 'crld'"),
]


@pytest.mark.parametrize("extra,pattern", BAD_INPUT)
def test_bad_input_is_one_clear_line(demo_root, teacher_ckpt, tmp_path, train_in_process, extra, pattern):
    assert_one_error_line(*train_in_process(args(demo_root, tmp_path, "bad", f"teacher.ckpt={teacher_ckpt}") + extra),
                          pattern)


def test_bad_input_from_the_command_line(demo_root, teacher_ckpt, tmp_path):
    """The same through `python train.py` itself (its `__main__`): exit code 2 and one line."""
    extra, pattern = BAD_INPUT[0]
    r = _cli(args(demo_root, tmp_path, "bad", f"teacher.ckpt={teacher_ckpt}") + extra)
    assert_one_error_line(r.returncode, r.stderr, pattern)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda(demo_root, teacher_ckpt, tmp_path, train_in_process):
    rc, err = train_in_process(args(demo_root, tmp_path, "gpu", f"teacher.ckpt={teacher_ckpt}", "run.device=cuda"))
    assert rc == 2 and "CUDA is not available" in err


def test_wrong_class_count_teacher(demo_root, tmp_path, random_teacher, train_in_process):
    rc, err = train_in_process(args(demo_root, tmp_path, "bad", f"teacher.ckpt={random_teacher('resnet8', 100)}"))
    assert rc == 2 and "fc.weight: checkpoint (100, 64) vs model (10, 64)" in err


def test_eval_cli_reports_top1(demo_root, teacher_ckpt, tmp_path):
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--config",
                        os.path.join(ROOT, "configs/demo/ce.yaml"), "--ckpt", teacher_ckpt,
                        "--data", demo_root, "--json", str(out), "pipeline.num_workers=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and right_of(json.load(open(out))["val_top1"], 360)


def test_demo_quick_mode(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--quick", "--out", str(tmp_path / "runs"),
                        "--data", str(tmp_path / "demo")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| student resnet8 (crld) |" in r.stdout and "| teacher resnet20 (ce) |" in r.stdout
    table = json.load(open(tmp_path / "runs" / "demo_table.json"))
    assert set(table) >= {"teacher", "ce", "kd", "crld"}
    group = json.load(open(tmp_path / "runs" / "students_seed0" / "group.json"))  # the students: one group run
    assert [(s["method"], s["summary"]["best_top1"]) for s in group["students"]] == [
        (m, table[m][0]) for m in ("crld", "kd", "ce")]


def test_corrupt_image_from_a_worker_is_one_line(tmp_path, jpeg_folder):
    root = jpeg_folder(str(tmp_path / "f"))
    with open(os.path.join(root, "train", "dog", "2.jpg"), "wb") as f:
        f.write(b"garbage")
    r = _cli(["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=2", "method.name=ce",
              "model.name=resnet8", "pipeline.batch_size=2", "pipeline.num_workers=2", f"run.out_dir={tmp_path}",
              "optim.epochs=1", "run.progress=false"])
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "dog/2.jpg: cannot decode image" in err[0] and "Traceback" not in r.stderr
