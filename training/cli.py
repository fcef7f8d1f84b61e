"""Entry-point plumbing: a `UserError` becomes one line on stderr and exit code 2; anything else is a bug and
keeps its traceback."""
import ctypes
import logging
import os
import sys

from common.errors import UserError
from training.preemption import EXIT_PREEMPTED, Preempted


def one_line(exc: UserError) -> str:
    """The message of `exc`. A DataLoader worker re-raises the worker's exception type with the worker's whole
    traceback as the message; its last line is `module.TypeName: <the original message>`."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    marker = f"{type(exc).__name__}: "
    if len(lines) > 1 and marker in lines[-1]:
        return lines[-1].split(marker, 1)[1]
    return lines[-1]


def keep_freed_host_memory() -> bool:
    """glibc: serve every large allocation from the heap and keep freed memory for reuse.

    By default glibc maps each allocation over 32 MiB (a batch of float views, a CPU activation) with its
    own mmap and unmaps it on free, so the next batch page-faults and zeroes it again, a loss of throughput
    for every loader (docs/benchmarks.md). The cost is that the process keeps its peak heap, as a caching
    allocator does. CRLD_KEEP_FREED_MEMORY=0 opts out;
    forked DataLoader workers inherit the setting. False where libc has no mallopt (not glibc)."""
    if os.environ.get("CRLD_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def run_main(main) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    keep_freed_host_memory()
    try:
        main()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Preempted as e:
        print(f"preempted: {e} (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    except UserError as e:
        if os.environ.get("CRLD_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
