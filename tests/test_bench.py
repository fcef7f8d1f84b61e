"""`python -m bench loader` runs every backend on the same images and writes one record per pipeline."""
import json

import pytest

from common.errors import UserError
from bench.__main__ import main
from datasets_prep.make_jpeg_folder import make_jpeg_folder


def test_loader_benchmark_smoke(tmp_path):
    pytest.importorskip("ffcv")
    pytest.importorskip("nvidia.dali")
    data = make_jpeg_folder(str(tmp_path / "j"), train=32, val=4, classes=2, size=(96, 72))
    out = tmp_path / "b.json"
    main(["loader", "--pipelines", "torch,dali,ffcv,ffcv_two_decode", "--data", data, "--image-size", "48",
                "--batch-size", "8", "--batches", "2", "--warmup", "1", "--workers", "1", "--count-calls", "torch",
                "--json", str(out)])
    recs = json.load(open(out))
    assert [r["pipeline"] for r in recs] == ["torch", "dali", "ffcv", "ffcv_two_decode"]
    for r in recs:  # the rate is the asked batches' samples over the measured time
        assert (r["batches"], r["batch_size"], r["runs_samples_per_s"]) == (2, 8, [round(r["samples_per_s"], 1)])
        assert r["samples_per_s"] * r["seconds"] == pytest.approx(2 * 8)
    assert [r.get("route") for r in recs] == ["workers", "host", "host", None]
    assert [r.get("dataset_images") for r in recs] == [32, 32, 32, None]
    # the training process's Python calls per batch, counted (over an epoch boundary here) for the backend asked
    # only: each count spawns a process (tests/test_call_counts.py counts dali's, ffcv's and gpu's)
    assert recs[0]["python_calls_per_batch"] > 0 and all(r["python_calls_per_batch"] is None for r in recs[1:])


def test_loader_benchmark_counts_only_pipelines_it_runs():
    with pytest.raises(UserError, match=r"--count-calls=torch,dali: dali not in --pipelines=torch"):
        main(["loader", "--pipelines", "torch", "--count-calls", "torch,dali"])


def test_step_benchmark_smoke_reports_reference_and_cache(tmp_path):
    out = tmp_path / "s.json"
    recs = main(["step", "--teacher", "resnet14", "--student", "resnet8", "--num-classes", "10", "--image-size",
                       "16", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--teacher-source", "online,cache",
                       "--device", "cpu", "--json", str(out)])
    assert json.load(open(out)) == json.loads(json.dumps(recs))
    ref, online, cache = recs
    assert [r["reference"] for r in recs] == [True, False, False]
    assert ref["amp"] == "off" and not ref["channels_last"]
    assert (online["teacher_source"], cache["teacher_source"]) == ("online", "cache")
    for r in recs:
        assert (r["steps"], r["batch_size"], r["peak_memory_mib"]) == (2, 8, None)  # CPU: no device memory
        assert r["samples_per_s"] * r["ms_per_step"] / 1000 == pytest.approx(8)  # every step's samples counted
        assert r["vs_reference"] == pytest.approx(r["samples_per_s"] / ref["samples_per_s"])
        assert r["achieved_tflops"] == pytest.approx(r["gflops_per_sample"] * r["samples_per_s"] / 1000)
        # phase times against the step time would be a wall-clock verdict (on a loaded CPU they part 40-fold)
        assert set(r["phases_ms"]) == {"teacher", "student_forward", "backward", "optimizer"}
        assert all(v > 0 for v in r["phases_ms"].values())
    # the teacher's forward counts in the online step's FLOPs, not in the cached one
    assert online["gflops_per_sample"] > cache["gflops_per_sample"] > 0


def test_e2e_benchmark_smoke_builds_a_cache(tmp_path, demo_root):
    recs = main(["e2e", "--pipelines", "torch", "--teacher", "resnet8", "--student", "resnet8", "--data",
                       demo_root, "--batch-size", "16", "--steps", "2", "--warmup", "1", "--workers", "0",
                       "--teacher-source", "online,cache", "--device", "cpu", "data.subset=64"])
    assert [(r["pipeline"], r["teacher_source"], r["reference"]) for r in recs] == [
        ("torch", "online", True), ("torch", "online", False), ("torch", "cache", False)]
    for r in recs:
        assert (r["steps"], r["batch_size"]) == (2, 16) and 0 <= r["data_wait_frac"] <= 1
        assert r["vs_reference"] == pytest.approx(r["samples_per_s"] / recs[0]["samples_per_s"])
    b = recs[2]["cache_build"]
    assert (b["epochs"], b["world"]) == ([0, 1], 1)
    # one epoch of the 64-image subset over the build's time, as recorded: seconds to 0.01, samples/s to 0.1
    assert abs(b["samples_per_s"] * b["seconds"] - 64) <= 0.005 * b["samples_per_s"] + 0.05 * b["seconds"]


def test_e2e_benchmark_measures_a_group_against_solo_runs(tmp_path, demo_root):
    recs = main(["e2e", "--pipelines", "torch", "--teacher", "resnet8", "--student", "resnet8", "--data",
                 demo_root, "--batch-size", "16", "--steps", "2", "--warmup", "1", "--workers", "0",
                 "--teacher-source", "online", "--students", "1,3", "--no-reference", "--device", "cpu",
                 "data.subset=64"])
    solo, group = recs
    assert (solo["students"], group["students"]) == (1, 3)
    assert group["student_samples_per_s"] == pytest.approx(3 * group["samples_per_s"])
    assert group["vs_solo_runs"] == pytest.approx(group["student_samples_per_s"] / solo["samples_per_s"])
    assert solo["vs_solo_runs"] is None
