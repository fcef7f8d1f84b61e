"""Process-level set-up: device and precision, CPU threads, seeding, distributed environment, run directory."""
from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import platform
import random
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace

import numpy as np
import torch

from common.cpus import CpuUse, cpu_budget
from common.errors import RuntimeConfigError
from common.files import save_json_atomic, writing
from common.precision import amp_dtype
from pipelines import cpu_plan


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """Rank and world size from torchrun's environment (single process when absent)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, dist: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeConfigError(f"run.device={name} but CUDA is not available on this machine "
                                     f"(use run.device=cpu or auto)")
        if name == "cuda":
            name = f"cuda:{dist.local_rank}"
    return torch.device(name)


def autocast_for(amp: str, device: torch.device):
    """(context factory, dtype or None, needs GradScaler)."""
    dtype = amp_dtype(amp, device)
    if dtype is None:
        return nullcontext, None, False
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype, dtype == torch.float16


@contextmanager
def cpu_threads(cfg, device: torch.device):
    """The run's CPU plan (`pipelines.cpu_plan`) applied to this process before anything runs on torch's thread
    pools: the intra-op threads lowered to the step's share (never raised: OMP_NUM_THREADS, torchrun's default of
    1 or a caller's torch.set_num_threads stay when smaller), one inter-op thread. Yields the `CpuUse` applied
    (the start log's line, run_info.json's "cpus"). The intra-op count is restored on exit (tests and benchmarks
    train several times in one process); the inter-op count can be set once per process only, before inter-op
    work starts, so a later call keeps it."""
    budget = cpu_budget(cfg.run.cpus)
    plan = cpu_plan(cfg, device, budget)
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, plan.intra_op))
    if torch.get_num_interop_threads() > plan.interop:
        with suppress(RuntimeError):  # inter-op work has begun, or an earlier run set it
            torch.set_num_interop_threads(plan.interop)
    applied = replace(plan, intra_op=torch.get_num_threads(), interop=torch.get_num_interop_threads())
    try:
        yield CpuUse(budget, applied)
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def git_commit() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def write_run_info(run_dir: str, cfg_yaml: str, device: torch.device, cpus: dict) -> None:
    with writing(run_dir):
        os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    with writing(path, len(cfg_yaml)), open(path, "w") as f:
        f.write(cfg_yaml)
    info = {**git_commit(), "argv": sys.argv, "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device), "host": platform.node(), "cpus": cpus}
    save_json_atomic(os.path.join(run_dir, "run_info.json"), info)


def init_distributed(dist: Dist, device: torch.device, timeout_s: int) -> None:
    """NCCL on GPUs, gloo on CPUs, rendezvous from torchrun's environment (single or multi node). The
    timeout turns a rank that died or hangs into an error on the others instead of a silent hang."""
    if dist.world <= 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(let_backend_threads_settle)


def let_backend_threads_settle(limit_s: float = 1.0) -> None:
    """Before the interpreter finalizes, give the process group's worker threads the moment they need to drop
    the last collective's work. That drop releases tensors that have a Python object, which takes the GIL; a C++
    thread that asks for the GIL once finalization has begun is ended by CPython with pthread_exit, which aborts
    the process ("terminate called without an active exception", pytorch/pytorch#190489), so a rank that
    finished its run, or raised right after a collective, would die with SIGABRT. Waits (GIL released) until
    every other thread of the process has been asleep at two checks in a row, at most `limit_s`."""
    tasks, me = "/proc/self/task", str(threading.get_native_id())
    if not os.path.isdir(tasks):
        time.sleep(0.05)
        return
    deadline, calm = time.monotonic() + limit_s, 0
    while calm < 2 and time.monotonic() < deadline:
        time.sleep(0.005)  # a worker waiting for the GIL takes it here
        running = False
        for tid in os.listdir(tasks):
            if tid == me:
                continue
            try:
                with open(f"{tasks}/{tid}/stat") as f:
                    running |= f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                pass
        calm = 0 if running else calm + 1


def check_world(cfg, dist: Dist) -> None:
    """Every rank takes pipeline.batch_size / world samples per step: it must divide evenly."""
    b = cfg.pipeline.batch_size
    if dist.world > b:
        raise RuntimeConfigError(f"pipeline.batch_size={b} is smaller than the {dist.world} ranks; "
                                 f"each rank needs at least one sample per step")
    if b % dist.world:
        raise RuntimeConfigError(f"pipeline.batch_size={b} (the global batch) is not divisible by the "
                                 f"{dist.world} ranks; use a multiple of {dist.world}")


def check_same_config(cfg_yaml: str, dist: Dist) -> None:
    """All ranks must resolve the same config (an override or file differing on one node would
    otherwise train silently inconsistent replicas)."""
    if dist.world <= 1:
        return
    mine = hashlib.sha256(cfg_yaml.encode()).hexdigest()
    every = [None] * dist.world
    torch.distributed.all_gather_object(every, mine)
    odd = [r for r, h in enumerate(every) if h != every[0]]
    if odd:
        raise RuntimeConfigError(f"the resolved config differs between ranks (rank 0 vs ranks {odd}); "
                                 f"launch every rank with the same --config and overrides")
