"""LR as a pure function of the step; the optimiser choice."""
import pytest
import torch

from training.config import load_config
from training.student import build_optimizer
from training.runtime import RuntimeConfigError
from training.schedule import lr_at


def test_step_schedule_follows_mdistiller_milestones():
    o = load_config(None, []).optim  # lr 0.05, milestones 150/180/210
    spe = 10
    assert lr_at(0, spe, o) == 0.05
    assert lr_at(150 * spe - 1, spe, o) == 0.05          # last step of epoch 150 (1-based)
    assert lr_at(150 * spe, spe, o) == pytest.approx(0.005)
    assert lr_at(180 * spe, spe, o) == pytest.approx(0.0005)
    assert lr_at(239 * spe, spe, o) == pytest.approx(0.00005)


def test_warmup_then_cosine():
    o = load_config(None, ["optim.schedule=cosine", "optim.warmup_epochs=2", "optim.epochs=10",
                           "optim.lr=0.4", "optim.min_lr=0.0"]).optim
    spe = 5
    ramp = [lr_at(s, spe, o) for s in range(10)]
    assert ramp == sorted(ramp) and ramp[-1] == pytest.approx(0.4) and ramp[0] == pytest.approx(0.04)
    assert lr_at(10, spe, o) == pytest.approx(0.4)
    assert lr_at(30, spe, o) == pytest.approx(0.2)        # half-way through the cosine part
    assert lr_at(49, spe, o) < 0.001


def test_optimizer_impls():
    p = [torch.nn.Parameter(torch.zeros(3))]
    o = load_config(None, ["optim.nesterov=true"]).optim
    opt = build_optimizer(p, o, torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["foreach"] and opt.defaults["nesterov"]
    try:
        import apex  # noqa: F401
        has_apex = True
    except ImportError:
        has_apex = False
    if not has_apex:
        with pytest.raises(RuntimeConfigError, match="apex is not importable"):
            build_optimizer(p, load_config(None, ["optim.impl=apex"]).optim, torch.device("cpu"))


def test_apex_fused_sgd_when_apex_is_installed():
    apex_opt = pytest.importorskip("apex.optimizers", reason="NVIDIA apex not installed (it ships in NGC images)")
    if not torch.cuda.is_available():
        pytest.skip("apex's fused optimizers need CUDA")
    p = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
    opt = build_optimizer(p, load_config(None, ["optim.impl=apex"]).optim, torch.device("cuda"))
    assert isinstance(opt, apex_opt.FusedSGD)


def test_linear_lr_scaling_is_optional():
    from training.schedule import base_lr
    o = load_config(None, ["optim.lr=0.1"]).optim
    assert base_lr(o, 1024) == pytest.approx(0.1)
    o = load_config(None, ["optim.lr=0.1", "optim.lr_ref_batch=256"]).optim
    assert base_lr(o, 1024) == pytest.approx(0.4)
    assert lr_at(0, 10, load_config(None, ["optim.schedule=step"]).optim, base=0.4) == pytest.approx(0.4)
