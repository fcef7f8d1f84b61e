"""How many loader workers and host threads fit this process: the CPUs it may run on (its affinity mask, which
SLURM and containers set; not the node's core count), lowered to its cgroup's CPU quota (how Kubernetes and
docker --cpus limit a container), shared among the ranks on the node."""
from __future__ import annotations

import logging
import math
import os
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


def usable_cpus() -> int:
    """This rank's share of the CPUs the process may run on: the affinity mask, lowered to the cgroup quota
    (rounded up), shared by torchrun's LOCAL_WORLD_SIZE ranks per node."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def loader_workers(requested, at_least: int = 0) -> int:
    """`pipeline.num_workers`: `auto` leaves one CPU to the training loop and gives the rest to the loader; an
    explicit number above this rank's CPUs is lowered to them, with one warning line (more workers than CPUs
    only contend; FFCV's numba refuses more threads than cores)."""
    cpus = usable_cpus()
    if requested == "auto":
        return max(at_least, cpus - 1)
    n = int(requested)
    if n > cpus:
        if n not in _WARNED:
            log.warning("pipeline.num_workers=%d lowered to %d: this process may use %d CPU(s)", n, cpus, cpus)
            _WARNED.add(n)
        n = cpus
    return max(at_least, n)


def host_threads(requested: int) -> int:
    """A thread count where 0 means one per usable CPU (DALI's CPU threads, the host route's view cutting)."""
    return requested if requested > 0 else usable_cpus()
