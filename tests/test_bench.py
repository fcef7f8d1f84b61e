"""bench.py loader mode runs every backend on the same images and writes one record per pipeline."""
import json

import pytest

import bench
from datasets_prep.make_jpeg_folder import make_jpeg_folder


def test_loader_benchmark_smoke(tmp_path):
    pytest.importorskip("ffcv")
    pytest.importorskip("nvidia.dali")
    data = make_jpeg_folder(str(tmp_path / "j"), train=32, val=4, classes=2, size=(96, 72))
    out = tmp_path / "b.json"
    bench.main(["loader", "--pipelines", "torch,dali,ffcv,ffcv_two_decode", "--data", data, "--image-size", "48",
                "--batch-size", "8", "--batches", "2", "--warmup", "1", "--workers", "1", "--json", str(out)])
    recs = json.load(open(out))
    assert [r["pipeline"] for r in recs] == ["torch", "dali", "ffcv", "ffcv_two_decode"]
    assert all(r["samples_per_s"] > 0 and r["batch_size"] == 8 for r in recs)
