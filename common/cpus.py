"""This process's CPU budget and how it is split: the CPUs it may run on (its affinity mask, which SLURM and
containers set; not the node's core count), lowered to its cgroup's CPU quota (how Kubernetes and docker --cpus
limit a container), shared among the ranks on the node; then one plan that gives the loader's workers, DALI's
and the host route's threads and the training step's torch threads their share of it."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

log = logging.getLogger(__name__)
_WARNED = set()
SPIN_COUNT = "10000"


def spin_briefly() -> None:
    """OpenMP threads waiting at a barrier spin SPIN_COUNT times, then sleep (GNU OpenMP's GOMP_SPINCOUNT; its
    default spins 300,000 times), unless the user set a wait policy or a spin count: on a shared machine a
    spinning thread holds the core that the thread it waits for needs, while a short spin keeps a quiet machine's
    speed (docs/benchmarks.md, "Shared CPUs"). OpenMP reads it once, when torch loads it: call before importing
    torch."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_quota(root: str = "") -> Optional[float]:
    """CPUs the process's cgroup may use per period (its CFS quota: cgroup v2 `cpu.max` "QUOTA PERIOD", v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), as a container sees its own cgroup at the root; None without one."""
    root = root or CGROUP_ROOT
    v2 = _read(os.path.join(root, "cpu.max"))
    if v2:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    for v1 in ("cpu", "cpu,cpuacct"):
        quota, period = (_read(os.path.join(root, v1, f"cpu.cfs_{k}_us")) for k in ("quota", "period"))
        if quota and period and int(quota) > 0:
            return int(quota) / int(period)
    return None


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may keep busy, with what they were worked out from (the start log, run_info.json)."""
    cpus: int                # the budget
    quota: Optional[float]   # the cgroup's CPUs per period; None: no quota
    online: int              # the node's online CPUs
    affinity: int            # CPUs in this process's affinity mask
    ranks: int = 1           # LOCAL_WORLD_SIZE: the node's ranks share the CPUs
    chosen: int = 0          # run.cpus: a budget set by the user (0: measured)

    def line(self) -> str:
        """`cpus: 8 (quota 8 of 128 online; affinity 128)`, `cpus: 2 (no quota; 2 online; affinity 2)`."""
        seen = (f"quota {self.quota:g} of {self.online} online" if self.quota is not None
                else f"no quota; {self.online} online")
        parts = ([f"run.cpus={self.chosen}"] if self.chosen else []) + [seen, f"affinity {self.affinity}"]
        if self.ranks > 1 and not self.chosen:
            parts.append(f"shared by {self.ranks} ranks")
        return f"cpus: {self.cpus} ({'; '.join(parts)})"


def cpu_budget(chosen: int = 0) -> CpuBudget:
    """This rank's share of the CPUs the process may run on: the affinity mask, lowered to the cgroup quota
    (rounded up), shared by torchrun's LOCAL_WORLD_SIZE ranks per node; `chosen` (run.cpus), when set, replaces
    it (a quota this process cannot see, or CPUs left to other jobs)."""
    online = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else online
    quota = cpu_quota()
    n = affinity if quota is None else min(affinity, max(1, math.ceil(quota)))
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return CpuBudget(chosen or max(1, n // ranks), quota, online, affinity, ranks, chosen)


# Threads of the host pool at most: more mostly contend for the interpreter lock (docs/benchmarks.md).
HOST_POOL_MAX = 16
LOADER_KEYS = {"torch": "pipeline.num_workers", "ffcv": "pipeline.num_workers", "dali": "pipeline.dali_threads"}


@dataclass(frozen=True)
class ThreadPlan:
    """Every thread count of a run, drawn from one budget. The loader's threads (DataLoader worker processes,
    each with one torch thread as DataLoader sets it; FFCV's or DALI's threads) prepare batches beside the
    training process's main thread. That thread either runs the step (its intra-op threads) or, between steps,
    waits for the host pool to cut views (dali, ffcv): those two take turns, so each may have what the loader
    leaves. The inter-op pool runs no work in eager training (torch.jit.fork, torch.futures): one thread."""
    budget: int
    workers: int = 0        # pipeline.num_workers (torch, ffcv)
    dali_threads: int = 0   # pipeline.dali_threads (dali)
    host_threads: int = 0   # pipeline.host_threads (dali, ffcv)
    intra_op: int = 1       # torch.set_num_threads of the training process: at most this many
    interop: int = 1        # torch.set_num_interop_threads

    @property
    def at_once(self) -> int:
        """The most threads this plan keeps busy together."""
        return self.workers + self.dali_threads + max(self.intra_op, self.host_threads)

    def line(self) -> str:
        named = [(self.workers, "loader workers"), (self.dali_threads, "DALI"), (self.host_threads, "host")]
        return ", ".join([f"{n} {what}" for n, what in named if n] + [f"{self.intra_op} intra-op",
                                                                     f"{self.interop} inter-op"])


@dataclass(frozen=True)
class CpuUse:
    """A budget and the thread counts a process applied from it: the start log's line, run_info.json's entry."""
    budget: CpuBudget
    threads: ThreadPlan

    def line(self) -> str:
        return f"{self.budget.line()}; threads: {self.threads.line()}"

    def info(self) -> dict:
        seen = {k: v for k, v in asdict(self.budget).items() if k != "cpus"}
        counts = {k: v for k, v in asdict(self.threads).items() if k != "budget"}
        return {"budget": self.budget.cpus, **seen, **counts}


def _fit(key: str, asked: int, cap: int, budget: int) -> int:
    """An explicit count above its share, lowered to it with one warning line (more threads than CPUs only
    contend; FFCV's numba refuses more threads than cores)."""
    if asked <= cap:
        return asked
    if (key, asked, cap) not in _WARNED:
        log.warning("%s=%d lowered to %d: this process may use %d CPU(s) for the loader and the training step "
                    "together (run.cpus sets that budget)", key, asked, cap, budget)
        _WARNED.add((key, asked, cap))
    return cap


def thread_plan(budget: int, device_type: str, pipeline: str, host_views: bool = True, workers="auto",
                dali_threads: int = 0, host_threads: int = 0) -> ThreadPlan:
    """The split of `budget` CPUs for `pipeline` training on `device_type`. `workers`: pipeline.num_workers
    (auto or a count); `dali_threads`, `host_threads`: 0 for auto. `host_views`: the host route (the training
    process cuts views on its pool), else the accelerator route.

    The loader's share (auto): when the step runs on the CPU it is the work, so the loader has a quarter (the
    torch backend below 4 CPUs none: batches are made between steps, and the step's threads keep every CPU;
    docs/benchmarks.md, "Shared CPUs"). On CUDA the loader has all but one CPU, the one left to the step (the
    torch backend's workers do all the per-sample work; on the accelerator route the step and the finishing are
    kernel launches), or half where the training process also cuts views on the host. An explicit count is lowered to all but one CPU (at least one:
    a user who asks for workers gets one). On CUDA the step only launches kernels: one intra-op thread; on a CPU
    the step has what the loader leaves. At most `budget` threads run at once, and 2 with a budget of one CPU
    where the loader needs a thread of its own (dali, ffcv, explicit workers)."""
    key = LOADER_KEYS.get(pipeline)  # None: the training process alone (gpu)
    asked = {"pipeline.num_workers": workers, "pipeline.dali_threads": dali_threads or "auto"}.get(key, 0)
    least = 1 if pipeline in ("dali", "ffcv") else 0
    cuts_on_host = pipeline in ("dali", "ffcv") and host_views
    if asked == "auto":
        if device_type == "cpu":
            loader = budget // 4
        elif cuts_on_host:
            loader = budget // 2
        else:
            loader = budget - 1
        loader = max(least, loader)
    else:
        loader = max(least, _fit(key, int(asked), max(1, budget - 1), budget)) if key else 0
    rest = max(1, budget - loader)
    host = 0
    if pipeline in ("dali", "ffcv"):
        host = _fit("pipeline.host_threads", host_threads, rest, budget) if host_threads else min(HOST_POOL_MAX, rest)
    return ThreadPlan(budget, workers=loader if key == "pipeline.num_workers" else 0,
                      dali_threads=loader if key == "pipeline.dali_threads" else 0, host_threads=host,
                      intra_op=1 if device_type == "cuda" else rest, interop=1)
