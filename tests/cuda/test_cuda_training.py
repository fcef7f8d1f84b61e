"""train.py on the device: one short CRLD epoch of the demo config through each backend, from a random teacher."""
import json
import math
import os

import pytest
import torch

import train
from datasets_prep.make_demo import make_demo
from pipelines import available_pipelines
from training.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_epoch(device, work, pipeline):
    root = make_demo(os.path.join(work, "demo"))
    teacher = os.path.join(work, "teacher_resnet8.pt")
    if not os.path.exists(teacher):
        torch.manual_seed(0)
        torch.save({"model": create_model("resnet8", 10).state_dict()}, teacher)
    return train.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "--pipeline", pipeline,
                       f"data.root={root}", f"run.out_dir={os.path.join(work, 'runs')}", f"run.name={pipeline}",
                       "data.subset=256", "pipeline.batch_size=64", "optim.epochs=1", "optim.warmup_epochs=0",
                       "run.progress=false", "model.name=resnet8", "teacher.name=resnet8", f"teacher.ckpt={teacher}",
                       f"run.device={device}", "--overwrite"])


@pytest.mark.cuda
@pytest.mark.parametrize("pipeline", [
    "torch", "gpu",
    pytest.param("dali", marks=[pytest.mark.dali, pytest.mark.skipif("dali" not in available_pipelines(),
                                                                     reason="needs nvidia.dali")])])
def test_one_crld_epoch(device, work, pipeline, record_property):
    """The run finishes one epoch with a finite loss (train.py stops a student whose loss is not), and
    validation ran."""
    s = one_epoch(device, work, pipeline)
    with open(os.path.join(work, "runs", pipeline, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    record_property("summary", f"loss {epochs[-1]['train_loss']:.3f}, top-1 {s['best_top1']:.2f}")
    assert s["epochs"] == 1 and len(epochs) == 1 and math.isfinite(epochs[0]["train_loss"]), (s, epochs)
    assert 0 <= epochs[0]["val_top1"] <= 100 and "val_top5" in epochs[0], epochs
