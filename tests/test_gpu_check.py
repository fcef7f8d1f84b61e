"""scripts/gpu_check.py on the CPU: the --cpu-dry-run code paths, the report files, and exit 3 without CUDA."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
ENV_KEYS = {"torch", "cuda", "cudnn", "device_name", "capability", "memory_gib", "python", "dali", "ffcv", "apex"}
CORRECTNESS = {"resnet8x4_crld_bf16_channels_last", "resnet8x4_crld_fp16_channels_last", "augmenter_device_vs_cpu",
               "strong_graph_program_vs_cpu"}


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "2", **extra}
    env.pop("CRLD_TRACEBACK", None)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r = subprocess.run([sys.executable, SCRIPT, str(out), "--cpu-dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=_env(CUDA_VISIBLE_DEVICES=""), check=False)
    return out, r


def test_cpu_dry_run_writes_reports(dry_run):
    out, r = dry_run
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    assert ENV_KEYS <= set(doc["env"]), ENV_KEYS - set(doc["env"])
    assert doc["env"]["dry_run"] is True and doc["finished"] is True and doc["correctness_ok"] is True
    for name in ("dali", "ffcv", "apex"):
        assert isinstance(doc["env"][name]["importable"], bool)
    checks = {c["name"]: c for c in doc["checks"]}
    assert CORRECTNESS <= set(checks) and all(checks[n]["ok"] for n in CORRECTNESS), checks
    assert checks["matmul_bf16_tflops"]["details"]["tflops"] > 0
    assert checks["bench_step_cli"]["ok"], checks["bench_step_cli"]
    # the dry run's step benchmark (a tiny pair) completes and reports its configurations
    step = checks["step_cpu_resnet8_resnet8"]
    assert step["ok"], step
    assert [r["teacher_source"] for r in step["details"]["records"]] == ["online", "online", "cache"], step
    assert all(r["samples_per_s"] > 0 and r["device"] == "cpu" for r in step["details"]["records"]), step
    md = (out / "gpu_check.md").read_text()
    for s in ("## Environment", "## Checks", "augmenter_device_vs_cpu", "matmul_bf16_tflops", "| torch |"):
        assert s in md, s


@pytest.fixture
def gpu_check(script_module):
    return script_module("gpu_check")


def test_augmenter_check_catches_a_mismatch(monkeypatch, gpu_check):
    """The comparison can fail: a "device" result off by 2 grey levels in one pixel is caught, its ops named."""
    import torch

    real, calls = gpu_check.apply_strong_batch, []

    def skewed(x, params, channels_last_input=False):  # calls alternate: CPU reference, then "device"
        y = real(x, params, channels_last_input).contiguous()
        calls.append(1)
        if len(calls) % 2 == 0:
            v = int(y.view(-1)[0])
            y.view(-1)[0] = v - 2 if v >= 2 else v + 2
        return y

    monkeypatch.setattr(gpu_check, "apply_strong_batch", skewed)
    ok, details = gpu_check.check_augment(torch.device("cpu"), small=True)
    assert not ok, details
    for layout in ("nhwc", "nchw"):
        r = details[layout]
        assert r["max_abs_diff"] == 2 and r["samples_differing"] == 1 and r["ops_in_differing_samples"], r


def test_graph_program_check_catches_a_mismatch(monkeypatch, gpu_check):
    """The graph-program comparison can fail: one sample's pixels changed on the "device" side is caught."""
    from pipelines import randaugment_static

    real = randaugment_static.StrongGraph.__call__

    def skewed(self, x, params, channels_last_input=False):
        y = real(self, x, params, channels_last_input).clone()
        y[0] = 255 - y[0]
        return y

    monkeypatch.setattr(randaugment_static.StrongGraph, "__call__", skewed)
    import torch
    ok, details = gpu_check.check_graph_program(torch.device("cpu"), small=True)
    assert not ok and all(r["samples_differing"] == 1 for r in details["batches"]), details


def test_without_cuda_exits_3_with_message(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=_env(CUDA_VISIBLE_DEVICES=""), check=False)
    assert r.returncode == 3, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0], r.stderr


def test_shell_wrapper_usage_and_passthrough(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60, env=_env(CUDA_VISIBLE_DEVICES="",
                                                                            PYTHON=sys.executable), check=False)
    assert r.returncode == 3 and "no CUDA device" in r.stderr, r.stdout + r.stderr


FAKE_BENCH = '''import json, sys
a = sys.argv[1:]
if "--help" in a:
    print("usage: bench.py step --teacher T --student S --teacher-source online,cache ...")
    sys.exit(0)
if "resnet34" in a:  # the ImageNet run fails
    sys.exit("error: out of memory")
json.dump([{"teacher_source": s, "samples_per_s": 1234.5, "student": a[a.index("--student") + 1]}
           for s in a[a.index("--teacher-source") + 1].split(",")], open(a[a.index("--json") + 1], "w"))
'''


def test_step_benchmark_records_results_and_failures(tmp_path, monkeypatch, gpu_check):
    """With a stand-in bench.py: records parsed into the report, a failing run recorded, not fatal."""
    fake = tmp_path / "repo"
    fake.mkdir()
    (fake / "bench.py").write_text(FAKE_BENCH)
    monkeypatch.setattr(gpu_check, "ROOT", str(fake))
    ok, det = gpu_check.check_step_cli()
    assert ok, det
    ok, det = gpu_check.check_step("cifar_resnet32x4_resnet8x4", str(tmp_path), False, 60)
    assert ok and [r["teacher_source"] for r in det["records"]] == ["online", "cache"], det
    assert "samples_per_s=1234" in det["summary"] and "--batch-size 256" in det["cmd"]
    ok, det = gpu_check.check_step("imagenet_resnet34_resnet18", str(tmp_path), False, 60)
    assert not ok and "out of memory" in det["summary"], det
