"""Busy neighbours: processes spinning on the CPUs, as other jobs on a shared node do, so that `python -m bench e2e
--neighbours N` measures a run quiet and then beside N of them. They inherit this process's affinity mask (and
cgroup), so they compete for the CPUs the run may use."""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

SPIN = "while True: pass"


@contextmanager
def busy_neighbours(n: int):
    """`n` pure-Python processes spinning for the `with` block (yields their pids); killed and reaped when it
    ends, also when it ends by an exception, so no neighbour outlives the measurement."""
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-S", "-c", SPIN], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def beside_neighbours(measure, n: int, quiet_rate: float) -> dict:
    """A record's loaded figures: `measure()` -> (samples, seconds, seconds waiting for data) run beside `n`
    busy neighbours, and its rate over the quiet one."""
    with busy_neighbours(n):
        samples, seconds, wait = measure()
    rate = samples / seconds
    return {"neighbours": n, "quiet_samples_per_s": quiet_rate, "loaded_samples_per_s": rate,
            "loaded_data_wait_frac": wait / seconds, "loaded_vs_quiet": rate / quiet_rate}


def print_loaded(records) -> None:
    """The quiet and loaded rates of each e2e record, beside the main table."""
    if not records:
        return
    print(f"beside {records[0]['neighbours']} busy neighbour process(es):")
    print(f"{'config':<40} {'quiet/s':>9} {'loaded/s':>9} {'loaded/quiet':>13}")
    for r in records:
        name = f"{'REFERENCE ' if r['reference'] else ''}{r['pipeline']}/{r['teacher_source']}/amp={r['amp']}"
        print(f"{name:<40} {r['quiet_samples_per_s']:>9.1f} {r['loaded_samples_per_s']:>9.1f} "
              f"{r['loaded_vs_quiet']:>12.2f}x")
