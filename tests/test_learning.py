"""Training learns: short runs on the demo digits (10 classes, chance 10 %) reach a top-1 far above chance
through every backend, and students trained by distillation alone (cross-entropy weight 0) learn from a
trained teacher.

The thresholds sit far above chance and well below what a sound run reaches (docs/benchmarks.md, "Learning
checks"), so that a broken loss, labels paired with the wrong images, a normalisation that differs between
training and validation, or teacher logits paired with the wrong samples fail them, while seeds and backends
(whose views are equal or within a grey level) pass.
"""
import os

import pytest

import train
from pipelines import available_pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROM_SCRATCH_TOP1 = 50.0   # CE, 4 epochs of the 1,437 training digits
DISTILLED_TOP1 = 35.0      # KD / CRLD without CE, 2 epochs, from the torch run's model as teacher


def _run(config, demo_root, out, name, *over):
    return train.main(["--config", os.path.join(ROOT, config), f"data.root={demo_root}", f"run.out_dir={out}",
                       f"run.name={name}", "pipeline.batch_size=32", "pipeline.val_batch_size=360",
                       "pipeline.num_workers=0", "optim.lr=0.2", "optim.warmup_epochs=0", "run.progress=false",
                       *over])


def _ce_run(pipeline, demo_root, demo_betons, out):
    if pipeline not in available_pipelines():
        pytest.skip(f"{pipeline}'s library is not installed")
    extra = [f"pipeline.ffcv_dir={demo_betons}"] if pipeline == "ffcv" else []
    return _run("configs/demo/ce.yaml", demo_root, out, pipeline, "--pipeline", pipeline, "optim.epochs=4", *extra)


@pytest.fixture(scope="module")
def torch_ce(demo_root, demo_betons, tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    return _ce_run("torch", demo_root, demo_betons, out), out / "torch" / "best.pt"


@pytest.mark.parametrize("pipeline", ["torch", "dali", "ffcv", "gpu"])
def test_a_short_run_learns_through_each_backend(pipeline, torch_ce, demo_root, demo_betons, tmp_path):
    summary = torch_ce[0] if pipeline == "torch" else _ce_run(pipeline, demo_root, demo_betons, tmp_path)
    assert summary["best_top1"] >= FROM_SCRATCH_TOP1, (pipeline, summary)


def test_students_learn_from_the_teacher_alone(torch_ce, demo_root, tmp_path):
    """CE weight 0: the students' only signal is the teacher's logits on their own views."""
    teacher_summary, teacher = torch_ce
    assert teacher_summary["best_top1"] >= FROM_SCRATCH_TOP1
    summaries = _run("configs/demo/crld.yaml", demo_root, tmp_path, "distil", "model.name=resnet8",
                     "teacher.name=resnet8", f"teacher.ckpt={teacher}", "optim.epochs=2", "method.ce_weight=0",
                     # gates open: the teacher of a 4-epoch run is rarely 90 % sure, and every pairing is checked
                     "method.tau_w=0", "method.tau_s=0", "optim.lr=0.04",  # its four KD terms weigh 5x one
                     "--student", "method.name=kd method.ce_weight=0 optim.lr=0.2")
    for method, s in zip(("crld", "kd"), summaries):
        assert s["best_top1"] >= DISTILLED_TOP1, (method, s)
