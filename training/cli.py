"""Entry-point plumbing: user errors become one line on stderr and exit code 2, not a traceback."""
import ctypes
import logging
import os
import sys

USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "RuntimeConfigError", "NonFiniteLoss", "CacheError",
               "FileNotFoundError", "FileExistsError")


def one_line(exc: BaseException) -> str:
    """The message of `exc`; for errors re-raised from DataLoader workers, the original line."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1]
    for name in USER_ERRORS:  # "pipelines.sources.DataError: <msg>" from a worker traceback
        marker = f"{name}: "
        if marker in line and len(lines) > 1:
            return line.split(marker, 1)[1]
    return line


def is_user_error(exc: BaseException) -> bool:
    names = {type(exc).__name__} | {c.__name__ for c in type(exc).__mro__}
    if names & set(USER_ERRORS):
        return True
    return any(f"{n}: " in str(exc) for n in USER_ERRORS)


def keep_freed_host_memory() -> bool:
    """glibc: serve every large allocation from the heap and keep freed memory for reuse.

    By default glibc maps each allocation over 32 MiB (a batch of float views, a CPU activation) with its
    own mmap and unmaps it on free, so the next batch page-faults and zeroes it again: on the 2-core machine
    that cost the loaders 20-30% of their throughput (docs/benchmarks.md). The cost
    is that the process keeps its peak heap, as a caching allocator does. CRLD_KEEP_FREED_MEMORY=0 opts out;
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
    except Exception as e:  # noqa: BLE001 - the point is to classify
        if is_user_error(e) and not os.environ.get("CRLD_TRACEBACK"):
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        raise
