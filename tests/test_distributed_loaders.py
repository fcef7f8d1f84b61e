"""Every backend shards an epoch over real torch.distributed ranks (gloo, 2 processes): each rank gets
the same number of training samples and together they cover the dataset (the padding repeats at most
one sample per rank); validation covers the split exactly once."""
import json
import multiprocessing
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines import build_loaders
from training.config import load_config
from training.runtime import Dist, init_distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, over, out):
    # a rank that torchrun starts forks its loader workers (Linux's default); a child of mp.spawn would spawn them,
    # each re-importing torch (about 8 s per loader here)
    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    init_distributed(Dist(rank, world, rank), torch.device("cpu"), 300)  # as train.py joins, exit hook included
    try:
        train, val, _ = build_loaders(load_config(None, over), torch.device("cpu"), rank, world)
        train.set_epoch(1)
        idx = torch.cat([b.index for b in train]).tolist()
        val_idx = torch.cat([b.index for b in val]).tolist()
        with open(f"{out}.{rank}", "w") as f:
            json.dump([idx, val_idx], f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pipe", ["torch", "dali", "ffcv", "gpu"])
def test_two_ranks_cover_the_epoch(pipe, demo_cut, tmp_path):
    if pipe in ("dali", "ffcv"):
        pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[pipe])
    # a cut of the demo set (the full one is 1437 / 359): both splits odd, so each of the 2 ranks needs a
    # padding sample in training and validation must not count its padding
    n, n_val = 191, 59
    demo_root = demo_cut(n, n_val, betons=pipe == "ffcv")
    over = ["data.dataset=demo", f"data.root={demo_root}", "data.num_classes=10", f"pipeline.name={pipe}",
            "pipeline.batch_size=32", "pipeline.num_workers=1", "pipeline.drop_last=false", "method.name=crld"]
    if pipe == "ffcv":
        over.append(f"pipeline.ffcv_dir={os.path.join(demo_root, 'ffcv')}")
    out = str(tmp_path / "idx")
    ctx = mp.spawn(_rank_main, args=(2, _free_port(), over, out), nprocs=2, join=False)
    deadline = time.time() + 300
    while not ctx.join(timeout=5):  # a hung rank must fail the test, not the whole CI run
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{pipe}: ranks did not finish in 300 s")
    (a, va), (b, vb) = (json.load(open(f"{out}.{r}")) for r in range(2))
    assert len(a) == len(b) == (n + 1) // 2
    assert set(a) | set(b) == set(range(n))
    assert len(set(a) & set(b)) <= 1
    # validation: every sample exactly once over the ranks, so the reduced accuracy counts none twice
    assert sorted(va + vb) == list(range(n_val))
