"""How many loader workers and host threads fit this process: the CPUs it may run on (its affinity mask, which
SLURM, Kubernetes and containers set; not the node's core count), shared among the ranks on the node."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
_WARNED = set()


def usable_cpus() -> int:
    """This rank's share of the CPUs the process may run on (torchrun's LOCAL_WORLD_SIZE ranks per node)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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
