"""Numerics on the device: CRLD steps under autocast with channels-last, the batched strong augmenter and the
`graph` strong program (compiled, captured in a CUDA graph, replayed) against the CPU's results."""
import math

import numpy
import pytest
import torch

from pipelines.augment_spec import STRONG_OPS
from pipelines.randaugment_graph import StrongGraph
from pipelines.randaugment_segmented import StrongBatch, apply_strong_batch
from pipelines.view_params import strong_draws
from training.losses import crld_loss
from training.models import create_model

CPU = torch.device("cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_crld_steps_under_autocast_channels_last(device, small, amp, record_property):
    """resnet8x4 student and teacher, channels-last, optimiser steps under autocast (fp16 with a grad scaler):
    logits in the autocast dtype, CRLD's loss and every gradient finite, the parameters updated."""
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    student = create_model("resnet8x4", 100).to(device, memory_format=torch.channels_last).train()
    teacher = create_model("resnet8x4", 100).to(device, memory_format=torch.channels_last).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10, enabled=amp == "fp16")
    n, steps = (4, 1) if small else (128, 3)  # CPU fp16 kernels are slow: one step in a dry run
    x_w, x_s = (torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last) for _ in "ws")
    y = torch.randint(0, 100, (n,), device=device)
    before = [p.detach().clone() for p in student.parameters()]
    losses, grads_finite = [], True
    for _ in range(steps):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            t_w, t_s = teacher(x_w), teacher(x_s)
        with torch.autocast(device.type, dtype=dtype):
            s_w, s_s = student(x_w), student(x_s)
        # tau = 0: both confidence gates open, so every KD term contributes.
        out = crld_loss(s_w, s_s, t_w, t_s, y, temperature=4.0, ce_weight=1.0, wv_weight=1.0, cv_weight=1.0,
                        tau_w=0.0, tau_s=0.0)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(opt)
        grads_finite &= all(bool(torch.isfinite(p.grad).all()) for p in student.parameters() if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        losses.append(float(out["loss"].detach()))
    moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
    record_property("summary", f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, batch {n}")
    assert s_w.dtype == dtype and all(map(math.isfinite, losses)) and grads_finite and moved, (losses, moved)


def augment_diff(device, small, augment=apply_strong_batch):
    """The strong augmenter on `device` against itself on the CPU (same uint8 batch, same draws), per layout:
    max |device - cpu| in grey levels and the ops of the samples that differ."""
    n, hw = (16, 24) if small else (512, 64)
    x = torch.randint(0, 256, (n, hw, hw, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    draws = strong_draws(0, 0, numpy.arange(n))
    params = StrongBatch.from_draws(draws)
    out = {}
    for layout, inp, nhwc in (("nhwc", x, True), ("nchw", x.permute(0, 3, 1, 2).contiguous(), False)):
        ref = apply_strong_batch(inp, params, channels_last_input=nhwc)
        got = augment(inp.to(device), params, channels_last_input=nhwc)
        diff = (ref.int() - got.cpu().int()).abs()
        bad = (diff.flatten(1).amax(1) > 0).nonzero().flatten().tolist()
        out[layout] = {"max_abs_diff": int(diff.max()), "samples_differing": len(bad),
                       "ops": sorted({STRONG_OPS[o].name for i in bad for o in draws.ops[i].tolist()})}
    return out


@pytest.mark.cuda
def test_augmenter_on_device_matches_cpu(device, small, record_property):
    """Within 1 grey level (float rounding), both layouts."""
    d = augment_diff(device, small)
    record_property("summary", ", ".join(f"{k}: max diff {r['max_abs_diff']}, {r['samples_differing']} samples"
                                         for k, r in d.items()))
    assert all(r["max_abs_diff"] <= 1 for r in d.values()), d


def test_augmenter_comparison_catches_two_grey_levels():
    """A "device" result off by 2 grey levels in one pixel is caught, with the ops of that sample named."""
    def skewed(x, params, channels_last_input=False):
        y = apply_strong_batch(x, params, channels_last_input).contiguous()
        v = int(y.view(-1)[0])
        y.view(-1)[0] = v - 2 if v >= 2 else v + 2
        return y

    d = augment_diff(CPU, True, skewed)
    assert all(r["max_abs_diff"] == 2 and r["samples_differing"] == 1 and r["ops"] for r in d.values()), d


def graph_program_diff(device, small, program=None):
    """`pipeline.strong_program=graph` on `device` against the segmented augmenter on the CPU over 4 batches
    (the first runs eagerly, the second is the capture's): the fraction of pixels that differ per batch."""
    n, hw = (16, 24) if small else (256, 64)
    gen, program, rows = torch.Generator().manual_seed(1), program or StrongGraph(), []
    for b in range(4):
        x = torch.randint(0, 256, (n, hw, hw, 3), dtype=torch.uint8, generator=gen)
        params = StrongBatch.from_draws(strong_draws(0, b, numpy.arange(n)))
        got = program(x.to(device), params, channels_last_input=True).cpu()
        differ = (got != apply_strong_batch(x, params, channels_last_input=True)).any(-1)
        rows.append({"frac_pixels_differing": float(differ.float().mean()),
                     "samples_differing": int(differ.flatten(1).any(1).sum())})
    return rows


@pytest.mark.cuda
def test_graph_program_on_device_matches_cpu(device, small, record_property):
    """At most 0.2% of pixels differ (the segmented augmenter's own tolerance against PIL,
    tests/test_augment_segmented.py): the compiled graph may round a division differently in the last bit."""
    rows = graph_program_diff(device, small)
    worst = max(r["frac_pixels_differing"] for r in rows)
    record_property("summary", f"worst batch {worst:.5f} of pixels differ (tolerance 0.002)")
    assert worst <= 0.002, rows


def test_graph_program_comparison_catches_a_changed_sample():
    graph = StrongGraph()

    def skewed(x, params, channels_last_input=False):
        y = graph(x, params, channels_last_input).clone()
        y[0] = 255 - y[0]
        return y

    assert all(r["samples_differing"] == 1 for r in graph_program_diff(CPU, True, skewed))
