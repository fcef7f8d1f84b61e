"""One CPU budget per process: measured from the affinity mask, the cgroup quota (v1, v2) and the node's ranks, or
set by run.cpus; split among the loader's workers, DALI's and the host route's threads and the step's torch
threads, which together never keep more CPUs busy than it; applied, logged and written by a real run."""
import itertools
import json
import logging
import os

import pytest
import torch

import train
from common import cpus
from common.cpus import CpuBudget, thread_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def node(monkeypatch, tmp_path):
    """node(affinity, files={}, ranks=1): this process on a node with that many CPUs in its mask, the cgroup
    files given (relative path -> text) and `ranks` ranks per node."""
    def make(affinity, files=(), ranks=1):
        root = tmp_path / f"cgroup{len(os.listdir(tmp_path))}"
        root.mkdir()
        for name, text in dict(files).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text + "\n")
        monkeypatch.setattr(cpus, "CGROUP_ROOT", str(root))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    return make


@pytest.mark.parametrize("files,quota,usable", [
    ({}, None, 16),                                                            # no cgroup files
    ({"cpu.max": "max 100000"}, None, 16),                                    # cgroup v2, no limit
    ({"cpu.max": "250000 100000"}, 2.5, 3),                                   # v2: 2.5 CPUs -> 3
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None, 16),   # v1, no limit
    ({"cpu,cpuacct/cpu.cfs_quota_us": "800000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 8.0, 8),
])
def test_the_cgroup_quota_lowers_the_affinity_mask(node, files, quota, usable):
    """A pod limited to a few CPUs on a large node: the CFS quota, not the affinity mask, is the limit."""
    node(16, files)
    b = cpus.cpu_budget()
    assert (cpus.cpu_quota(), b.quota, b.affinity, b.cpus) == (quota, quota, 16, usable)
    node(16, files, ranks=2)
    assert cpus.cpu_budget().cpus == max(1, usable // 2)


def test_the_affinity_mask_shared_among_the_nodes_ranks(node):
    node(4)
    assert cpus.cpu_budget().cpus == 4
    node(4, ranks=2)
    assert cpus.cpu_budget().cpus == 2
    node(4, ranks=8)  # more ranks than CPUs: one each
    assert cpus.cpu_budget().cpus == 1
    assert cpus.cpu_budget(chosen=3).cpus == 3  # run.cpus replaces the measured budget


def test_the_log_line():
    assert CpuBudget(8, 8.0, 128, 128).line() == "cpus: 8 (quota 8 of 128 online; affinity 128)"
    assert CpuBudget(2, None, 2, 2).line() == "cpus: 2 (no quota; 2 online; affinity 2)"
    assert CpuBudget(3, 2.5, 64, 16).line() == "cpus: 3 (quota 2.5 of 64 online; affinity 16)"
    assert CpuBudget(4, 8.0, 128, 128, ranks=2).line() == "cpus: 4 (quota 8 of 128 online; affinity 128; shared by 2 ranks)"
    assert CpuBudget(1, None, 2, 2, chosen=1).line() == "cpus: 1 (run.cpus=1; no quota; 2 online; affinity 2)"
    plan = thread_plan(8, "cpu", "torch")
    assert plan.line() == "2 loader workers, 6 intra-op, 1 inter-op"
    assert thread_plan(8, "cpu", "dali").line() == "2 DALI, 6 host, 6 intra-op, 1 inter-op"


PIPELINES = ("torch", "gpu", "dali", "ffcv")
LOADER_NEEDS_A_THREAD = ("dali", "ffcv")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_threads_of_a_plan_never_exceed_the_budget(device):
    """Every budget from 1 to 64, every backend and route, auto and explicit requests (small, the budget, far
    above it): the loader's threads plus the step's (or the host pool's, which takes turns with the step) fit."""
    for budget, pipe, host_views in itertools.product(range(1, 65), PIPELINES, (True, False)):
        for workers, dali, host in itertools.product(("auto", "0", "1", "2", str(budget), str(4 * budget)),
                                                     (0, 1, budget, 4 * budget), (0, 1, budget, 4 * budget)):
            p = thread_plan(budget, device, pipe, host_views, workers, dali, host)
            ask = (pipe, budget, workers, dali, host, p)
            loader = p.workers + p.dali_threads
            # one CPU can hold no loader thread beside the step: there a loader that needs one takes a second
            floor = 2 if budget == 1 and (pipe in LOADER_NEEDS_A_THREAD or pipe == "torch" and workers not in ("auto", "0")) else 1
            assert p.at_once == loader + max(p.intra_op, p.host_threads) <= max(budget, floor), ask
            assert loader + p.intra_op <= max(budget, floor) and loader + p.host_threads <= max(budget, floor), ask
            assert p.intra_op >= 1 and p.interop == 1, ask
            assert (p.dali_threads >= 1) == (pipe == "dali") and (p.host_threads >= 1) == (pipe in ("dali", "ffcv"))
            assert p.workers >= (pipe == "ffcv") and (pipe in ("torch", "ffcv") or p.workers == 0), ask
            if device == "cuda":
                assert p.intra_op == 1, ask  # the step launches kernels
            elif workers == "auto" and dali == 0 and host == 0 and budget > 1:
                assert p.at_once == budget, ask  # auto leaves no CPU idle


def test_auto_splits_and_explicit_requests(caplog):
    # a step on the CPU is the work: the torch backend's workers get a quarter, none below 4 CPUs
    assert thread_plan(8, "cpu", "torch") == cpus.ThreadPlan(8, workers=2, intra_op=6)
    assert thread_plan(2, "cpu", "torch") == cpus.ThreadPlan(2, intra_op=2)
    assert thread_plan(8, "cpu", "torch", workers="0") == cpus.ThreadPlan(8, intra_op=8)
    assert thread_plan(8, "cuda", "torch") == cpus.ThreadPlan(8, workers=7, intra_op=1)
    assert thread_plan(8, "cpu", "gpu") == cpus.ThreadPlan(8, intra_op=8)
    # on a CPU the loader has a quarter whatever the backend; on CUDA, the host route leaves the training
    # process half (it cuts views too)
    assert thread_plan(8, "cpu", "ffcv") == cpus.ThreadPlan(8, workers=2, host_threads=6, intra_op=6)
    assert thread_plan(8, "cuda", "ffcv") == cpus.ThreadPlan(8, workers=4, host_threads=4, intra_op=1)
    assert thread_plan(8, "cuda", "dali", host_views=False) == cpus.ThreadPlan(8, dali_threads=7, host_threads=1)
    assert thread_plan(1, "cpu", "ffcv", workers="0") == cpus.ThreadPlan(1, workers=1, host_threads=1)
    cpus._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="common.cpus"):
        assert thread_plan(2, "cpu", "torch", workers="8").workers == 1
        assert thread_plan(2, "cpu", "torch", workers="8").workers == 1  # warned once
        assert thread_plan(4, "cpu", "dali", dali_threads=2, host_threads=9).host_threads == 2
    assert [r.getMessage() for r in caplog.records] == [
        "pipeline.num_workers=8 lowered to 1: this process may use 2 CPU(s) for the loader and the training step "
        "together (run.cpus sets that budget)",
        "pipeline.host_threads=9 lowered to 2: this process may use 4 CPU(s) for the loader and the training step "
        "together (run.cpus sets that budget)"]


def test_run_cpus_must_be_a_count():
    from training.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"config key 'run.cpus': must be >= 0, got -1"):
        load_config(None, ["run.cpus=-1"])
    with pytest.raises(ConfigError, match=r"run.cpus"):
        load_config(None, ["run.cpus=two"])


def test_a_run_applies_logs_and_records_its_budget(demo_root, tmp_path, monkeypatch, caplog):
    """run.cpus=1 on the demo config: one intra-op thread while training, the caller's count back after, and
    run_info.json's "cpus" entry."""
    seen = []

    class Recording(train.Trainer):
        def fit(self):
            seen.append((torch.get_num_threads(), torch.get_num_interop_threads()))
            return super().fit()

    monkeypatch.setattr(train, "Trainer", Recording)
    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="train"):
        train.main(["--config", os.path.join(ROOT, "configs/demo/ce.yaml"), f"data.root={demo_root}",
                    f"run.out_dir={tmp_path}", "run.name=r", "data.subset=64", "pipeline.batch_size=32",
                    "pipeline.num_workers=auto", "optim.epochs=1", "optim.warmup_epochs=0", "run.progress=false",
                    "run.device=cpu", "run.cpus=1"])
    assert torch.get_num_threads() == before
    info = json.load(open(tmp_path / "r" / "run_info.json"))["cpus"]
    assert (info["budget"], info["chosen"], info["workers"], info["intra_op"]) == (1, 1, 0, 1)
    assert {"quota", "online", "affinity", "ranks", "dali_threads", "host_threads", "interop"} <= set(info)
    assert seen[0][0] == 1 and seen[0][1] == info["interop"]
    assert info["workers"] + max(info["intra_op"], info["host_threads"]) <= info["budget"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cpus: ")]
    assert len(lines) == 1 and lines[0].startswith("cpus: 1 (run.cpus=1; ")
    assert lines[0].endswith(f"; threads: 1 intra-op, {info['interop']} inter-op")


@pytest.mark.parametrize("crop", ["pad", "rrc"])  # ffcv's compiled crops finished on the host, or cut there
def test_the_host_pool_has_the_plans_threads(node, demo_betons, first_batches, monkeypatch, crop):
    """Every host pool a loader uses is the plan's size, whatever the node's CPUs (here 8 in the mask)."""
    from pipelines import cpu_plan, finish_views
    from training.config import load_config
    node(8)
    sizes, real_pool = [], finish_views.pool
    monkeypatch.setattr(finish_views, "pool", lambda threads: sizes.append(threads) or real_pool(threads))
    cfg = load_config(None, ["data.dataset=demo", "data.num_classes=10", f"pipeline.ffcv_dir={demo_betons}",
                             "pipeline.name=ffcv", "pipeline.batch_size=16", "run.cpus=4", "pipeline.host_threads=1",
                             f"data.train_crop={crop}"])
    assert cpu_plan(cfg, torch.device("cpu")).host_threads == 1
    first_batches(cfg, 1)
    assert sizes and set(sizes) == {1}
