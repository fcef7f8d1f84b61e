"""What a stop costs: the time from SIGTERM to exit of a training process, and the time to write a mid-epoch
checkpoint (`last.pt`, every student's state) for the demo's and an ImageNet student.

    python -m bench.preemption [--repeat 3] [--json docs/results/preemption_X.json]

The demo run (CRLD resnet8 from a random resnet20, `torch` loader inline) gets SIGTERM once it is in its second
epoch; the figure is the wall time until the process has exited with code 75 (its last step, the checkpoint,
the shutdown). Checkpoint cost: `Student.save("last.pt")` after one optimiser step (momentum buffers exist),
median of `--repeat`, for resnet8 (demo) and imagenet_resnet18 (1000 classes).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.records import machine, save_json
from datasets_prep.make_demo import make_demo
from training.cli import run_main
from training.config import load_config
from training.models import create_model
from training.preemption import EXIT_PREEMPTED
from training.student import Student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigterm_to_exit(data: str, folder: str, name: str) -> float:
    teacher = os.path.join(folder, "teacher.pt")
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet20", 10).state_dict()}, teacher)
    argv = ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), f"data.root={data}", f"run.out_dir={folder}",
            f"run.name={name}", "pipeline.num_workers=0", "run.progress=false", f"teacher.ckpt={teacher}"]
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(folder, name, "metrics.jsonl")
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):  # epoch 1 done: in the loop of epoch 2
        if p.poll() is not None:
            raise RuntimeError(f"the demo run ended early: {p.stderr.read()[-1500:]}")
        time.sleep(0.05)
    time.sleep(1.0)  # well inside epoch 2
    t0 = time.perf_counter()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    took = time.perf_counter() - t0
    if p.returncode != EXIT_PREEMPTED:
        raise RuntimeError(f"exit code {p.returncode}, not {EXIT_PREEMPTED}: {err[-1500:]}")
    return took


def checkpoint_seconds(model: str, num_classes: int, folder: str, repeat: int) -> dict:
    cfg = load_config(None, [f"model.name={model}", f"data.num_classes={num_classes}", "run.device=cpu"])
    st = Student(cfg, torch.device("cpu"), folder, 10, lambda: torch.autocast("cpu", enabled=False), False)
    size = 32 if num_classes <= 100 else 64
    loss = st.student(torch.randn(2, 3, size, size)).sum()
    loss.backward()
    st.opt.step()  # momentum buffers: the optimiser state a real checkpoint holds
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        st.save("last.pt")
        times.append(time.perf_counter() - t0)
    return {"model": model, "seconds": statistics.median(times), "all_s": times,
            "mib": os.path.getsize(os.path.join(folder, "last.pt")) / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    data = make_demo(args.data)
    with tempfile.TemporaryDirectory() as folder:
        stops = [sigterm_to_exit(data, folder, f"stop{k}") for k in range(args.repeat)]
        saves = [checkpoint_seconds(m, c, folder, args.repeat) for m, c in (("resnet8", 10),
                                                                            ("imagenet_resnet18", 1000))]
    rec = {"sigterm_to_exit_s": stops, "checkpoints": saves, "machine": machine()}
    print(f"SIGTERM to exit (demo, CRLD resnet8): {', '.join(f'{s:.2f}' for s in stops)} s")
    for s in saves:
        print(f"last.pt of {s['model']}: {s['mib']:.1f} MiB in {s['seconds'] * 1e3:.0f} ms (median of {args.repeat})")
    if args.json:
        save_json(args.json, [rec])
    return rec


if __name__ == "__main__":
    sys.exit(run_main(main))
