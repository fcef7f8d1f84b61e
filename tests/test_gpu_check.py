"""bench/gpu_check.py on the CPU: each comparison can fail, and exit 3 without CUDA (its --cpu-dry-run code paths
run in tests/test_gpu_run.py, as the first stages of bench/gpu_run.sh)."""
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "2", **extra}
    env.pop("CRLD_TRACEBACK", None)
    return env


def test_augmenter_check_catches_a_mismatch(monkeypatch):
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


def test_graph_program_check_catches_a_mismatch(monkeypatch):
    """The graph-program comparison can fail: one sample's pixels changed on the "device" side is caught."""
    from pipelines import randaugment_graph

    real = randaugment_graph.StrongGraph.__call__

    def skewed(self, x, params, channels_last_input=False):
        y = real(self, x, params, channels_last_input).clone()
        y[0] = 255 - y[0]
        return y

    monkeypatch.setattr(randaugment_graph.StrongGraph, "__call__", skewed)
    import torch
    ok, details = gpu_check.check_graph_program(torch.device("cpu"), small=True)
    assert not ok and all(r["samples_differing"] == 1 for r in details["batches"]), details


def test_without_cuda_exits_3_with_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=_env(CUDA_VISIBLE_DEVICES=""), check=False)
    assert r.returncode == 3, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0], r.stderr


def test_weak_view_check_takes_last_bit_differences_but_not_a_grey_level(monkeypatch, tmp_path):
    """The `gpu` route check compares grey levels: a "device" weak view off by one float ulp (a fused multiply-add)
    passes, one pixel off by one grey level fails."""
    import torch

    real = gpu_check._gpu_route

    def skewed_route(how):
        calls = []

        def route(root, dev):  # the check builds the CPU reference first, then the "device" route
            train, val, src = real(root, dev)
            calls.append(dev)
            if len(calls) == 1:
                return train, val, src
            std = src.mean_std[1][0]

            class Skewed:
                def set_epoch(self, e, start=0):
                    train.set_epoch(e, start)

                def __iter__(self):
                    for b in train:
                        w = b.weak.clone()
                        if how == "ulp":
                            w = torch.nextafter(w, torch.full_like(w, 10.0))
                        else:
                            w[0, 0, 3, 5] += 1.0 / (255 * std)
                        yield b._replace(weak=w)
            return Skewed(), val, src
        return route

    monkeypatch.setattr(gpu_check, "_gpu_route", skewed_route("ulp"))
    ok, det = gpu_check.check_gpu_pipeline(torch.device("cpu"), True, str(tmp_path))
    assert ok and not det["weak_bit_exact"] and det["weak_max_grey_levels"] == 0, det
    monkeypatch.setattr(gpu_check, "_gpu_route", skewed_route("level"))
    ok, det = gpu_check.check_gpu_pipeline(torch.device("cpu"), True, str(tmp_path))
    assert not ok and det["weak_max_grey_levels"] == 1, det


def test_prefetcher_check_catches_a_differing_batch(monkeypatch, tmp_path):
    """The prefetcher comparison can fail: the wrapped loader handing out one changed batch is caught."""
    import torch

    from pipelines import prefetch

    def wrap(loader, device):
        class Wrapped:
            def __init__(self):
                self.loader = loader

            def set_epoch(self, e, start=0):
                loader.set_epoch(e, start)

            def __iter__(self):
                for k, b in enumerate(loader):
                    yield b._replace(weak=b.weak + 1) if k == 1 else b
        return Wrapped()

    monkeypatch.setattr("pipelines.prefetched", wrap)
    ok, det = gpu_check.check_prefetcher(torch.device("cpu"), True, str(tmp_path))
    assert not ok and "DIFFER" in det["summary"], det
    assert prefetch.prefetched is not wrap
