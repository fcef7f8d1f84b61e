"""A group run against the same students trained as solo runs, one process each (as a user runs them).

    python -m bench.group_vs_solo [--epochs 3] [--pipeline torch] [--workers N] [--json docs/results/X.json]

Demo data, a random resnet20 teacher (weights do not change the cost), online teacher, deterministic. The group
is CRLD resnet8 (student 0), CRLD resnet14, KD resnet8 and CE resnet8; each solo run trains its student from the
config.yaml the group wrote for it. Reports each process's wall time (start-up included) and peak resident memory
(its own and its loader workers', the largest of them), the group's time over the solo runs' sum, and whether
every student's final weights equal its solo run's bit for bit.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from bench.records import machine, save_json
from datasets_prep.make_demo import make_demo
from training.checkpoint import safe_load
from training.cli import run_main
from training.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENTS = ["model.name=resnet14", "method.name=kd", "method.name=ce"]


def _timed(argv, env) -> tuple:
    """(wall seconds, peak RSS in MiB) of one train.py process; wait4's rusage covers the process and the
    children it reaped (loader workers), and ru_maxrss is the largest of them, in KiB on Linux."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            raise RuntimeError(f"train.py {' '.join(argv)} failed:\n{err.read()[-2000:].decode()}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--pipeline", default="torch")
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--workers", type=int, default=-1, help="pipeline.num_workers (default: the config's)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    data = make_demo(args.data)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as out:
        teacher = os.path.join(out, "teacher.pt")
        torch.manual_seed(0)
        torch.save({"model": create_model("resnet20", 10).state_dict()}, teacher)
        base = ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), f"data.root={data}", f"run.out_dir={out}",
                "run.name=g", f"optim.epochs={args.epochs}", f"pipeline.name={args.pipeline}",
                *([f"pipeline.num_workers={args.workers}"] if args.workers >= 0 else []), "run.progress=false",
                f"teacher.ckpt={teacher}", "run.deterministic=true"]
        group_s, group_mib = _timed(base + [a for s in STUDENTS for a in ("--student", s)], env)
        solo_s, solo_mib, equal = [], [], []
        for k in range(len(STUDENTS) + 1):
            mine = os.path.join(out, "g", f"student{k}")
            sec, mib = _timed(["--config", os.path.join(mine, "config.yaml"), f"run.out_dir={out}/solo"], env)
            solo_s.append(sec)
            solo_mib.append(mib)
            alone = os.path.join(out, "solo", f"g-student{k}" if k else "g")
            a, b = (safe_load(os.path.join(d, "last.pt"))["model"] for d in (mine, alone))
            equal.append(all(torch.equal(a[n], b[n]) for n in a))
    rec = {"epochs": args.epochs, "pipeline": args.pipeline,
           "num_workers": args.workers if args.workers >= 0 else "config", "students": ["crld resnet8"] + STUDENTS,
           "group_wall_s": group_s, "solo_wall_s": solo_s, "solo_sum_s": sum(solo_s),
           "group_over_solo": group_s / sum(solo_s), "group_peak_rss_mib": group_mib,
           "solo_peak_rss_mib": solo_mib, "weights_equal": equal, "machine": machine()}
    print(f"group of {len(solo_s)}: {group_s:.1f} s; solo runs: {' + '.join(f'{s:.1f}' for s in solo_s)} = "
          f"{sum(solo_s):.1f} s; group / solo = {rec['group_over_solo']:.2f}; peak RSS: group {group_mib:.0f} MiB, "
          f"solo {' / '.join(f'{m:.0f}' for m in solo_mib)} MiB; weights equal: {equal}")
    if args.json:
        save_json(args.json, [rec])
    return rec


if __name__ == "__main__":
    sys.exit(run_main(main))
