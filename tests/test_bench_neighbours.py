"""`python -m bench e2e --neighbours N`: busy neighbour processes start for the loaded measurement and are gone
after it, also when it raises; the records carry both rates and their ratio (structure only, never a verdict on
the speeds)."""
import os
import time

import pytest

from bench.__main__ import main
from bench.neighbours import SPIN, beside_neighbours, busy_neighbours


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cmdline(pid):
    """The process's arguments; read again while empty (a process just past exec shows none for a moment)."""
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode().split("\0")
        if args != [""] or time.monotonic() > deadline:
            return args
        time.sleep(0.01)


def test_neighbours_spin_inside_the_block_and_are_gone_after():
    with busy_neighbours(2) as pids:
        assert len(set(pids)) == 2 and all(alive(p) for p in pids)
        assert all(SPIN in cmdline(p) for p in pids)
    assert not any(alive(p) for p in pids)
    with busy_neighbours(0) as none:
        assert none == []


def test_neighbours_are_gone_when_the_measurement_raises():
    with pytest.raises(RuntimeError, match="the loader failed"):
        with busy_neighbours(3) as pids:
            raise RuntimeError("the loader failed")
    assert len(pids) == 3 and not any(alive(p) for p in pids)


def spinning_children():
    """This process's child processes running the neighbours' loop."""
    kids = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            kids += [int(p) for p in f.read().split()]
    return [p for p in kids if SPIN in cmdline(p)]


def test_loaded_figures_of_a_measurement():
    during = []

    def measure():
        during.extend(spinning_children())
        return 32, 2.0, 0.5

    rec = beside_neighbours(measure, 2, quiet_rate=32.0)
    assert rec == {"neighbours": 2, "quiet_samples_per_s": 32.0, "loaded_samples_per_s": 16.0,
                   "loaded_data_wait_frac": 0.25, "loaded_vs_quiet": 0.5}
    assert len(during) == 2 and spinning_children() == [] and not any(alive(p) for p in during)


def test_e2e_reports_quiet_and_loaded_rates(demo_root, capsys):
    recs = main(["e2e", "--pipelines", "torch", "--teacher", "resnet8", "--student", "resnet8", "--data", demo_root,
                 "--batch-size", "16", "--steps", "2", "--warmup", "1", "--workers", "0", "--teacher-source",
                 "online", "--no-reference", "--device", "cpu", "--neighbours", "1", "data.subset=64"])
    assert [(r["reference"], r["neighbours"]) for r in recs] == [(False, 1)]
    for r in recs:
        assert r["quiet_samples_per_s"] == r["samples_per_s"] and r["loaded_samples_per_s"] > 0
        assert r["loaded_vs_quiet"] == pytest.approx(r["loaded_samples_per_s"] / r["samples_per_s"])
        assert 0 <= r["loaded_data_wait_frac"] <= 1
        assert r["cpus"]["budget"] >= 1 and r["cpus"]["intra_op"] >= 1
    out = capsys.readouterr().out
    assert "beside 1 busy neighbour process(es):" in out and "loaded/quiet" in out


def test_neighbours_only_for_e2e():
    with pytest.raises(SystemExit):
        main(["step", "--neighbours", "2"])
    with pytest.raises(SystemExit):
        main(["e2e", "--neighbours", "-1"])
