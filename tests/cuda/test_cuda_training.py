"""train.py on the device: one short CRLD epoch of the demo config through each backend, from a random teacher."""
import json
import math

import pytest

from pipelines import available_pipelines


@pytest.mark.cuda
@pytest.mark.parametrize("pipeline", [
    "torch", "gpu",
    pytest.param("dali", marks=[pytest.mark.dali, pytest.mark.skipif("dali" not in available_pipelines(),
                                                                     reason="needs nvidia.dali")])])
def test_one_crld_epoch(device, one_epoch_crld, tmp_path, pipeline, record_property):
    """The run finishes one epoch with a finite loss (train.py stops a student whose loss is not), and
    validation ran."""
    s = one_epoch_crld(pipeline, f"run.device={device}")
    with open(tmp_path / pipeline / "metrics.jsonl") as f:
        epochs = [json.loads(line) for line in f]
    record_property("summary", f"loss {epochs[-1]['train_loss']:.3f}, top-1 {s['best_top1']:.2f}")
    assert s["epochs"] == 1 and len(epochs) == 1 and math.isfinite(epochs[0]["train_loss"]), (s, epochs)
    assert 0 <= epochs[0]["val_top1"] <= 100 and "val_top5" in epochs[0], epochs
