"""The batched tensor strong augmentation against its PIL definition, op by op."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.augment_spec import STRONG_OPS
from pipelines.randaugment_pil import PIL_OPS, apply_strong
from pipelines.randaugment_segmented import TENSOR_OPS, StrongBatch, apply_strong_batch
from pipelines.view_params import StrongDraws, StrongParams, strong_draws

# Measured on CPU with the pinned Pillow: every op is pixel-exact. The tolerance leaves room for
# float rounding on other devices: at most 0.2% of pixels may differ, by at most 1 level for the
# photometric ops (a geometric op may pick the neighbouring source pixel).
MAX_FRAC = 0.002


def draws_of(params):
    """StrongDraws holding these per-sample parameters (one op count), for the production path from_draws."""
    return StrongBatch.from_draws(StrongDraws(np.array([[o for o, _ in p.ops] for p in params], dtype=np.int64),
                                              np.array([[m for _, m in p.ops] for p in params], dtype=np.float64),
                                              np.array([p[1:] for p in params], dtype=np.float64)))


def images(rng, n=24):
    out = []
    for t in range(n):
        h, w = (int(v) for v in rng.integers(16, 72, 2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if t % 2:  # smooth, low-contrast content exercises the histogram ops differently
            arr = np.asarray(Image.fromarray(arr).resize((w // 4 + 1, h // 4 + 1)).resize((w, h), Image.BILINEAR))
            arr = (arr // 2 + 40).astype(np.uint8)
        out.append(np.ascontiguousarray(arr))
    return out


@pytest.mark.parametrize("spec", STRONG_OPS, ids=[s.name for s in STRONG_OPS])
def test_op_agrees_with_pil(spec):
    rng = np.random.default_rng(len(spec.name))
    geometric = spec.name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
    for arr in images(rng):
        mag = spec.low + (spec.high - spec.low) * rng.random()
        ref = np.asarray(PIL_OPS[spec.name](Image.fromarray(arr), mag)).astype(int)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
        got = TENSOR_OPS[spec.name](x, torch.tensor([mag], dtype=torch.float64))
        # apply_strong_batch stores op outputs into uint8 without rounding: they must be whole and in range
        assert torch.equal(got, got.round()) and got.min() >= 0 and got.max() <= 255, spec.name
        got = got[0].permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(ref - got)
        assert (diff > 0).mean() <= MAX_FRAC, (spec.name, mag, (diff > 0).mean())
        if not geometric:
            assert diff.max() <= 1, (spec.name, mag)


def test_whole_strong_view_matches_pil_batched_uint8_nhwc():
    rng = np.random.default_rng(1)
    batch = np.stack([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(32)])
    draws = strong_draws(0, 0, np.arange(32))
    params = [draws.params(i) for i in range(32)]
    got = apply_strong_batch(torch.from_numpy(batch), StrongBatch.from_draws(draws), channels_last_input=True)
    assert got.dtype == torch.uint8 and got.shape == batch.shape and got.is_contiguous()  # layout kept
    for i in range(32):
        ref = np.asarray(apply_strong(Image.fromarray(batch[i]), params[i]))
        assert (ref != got[i].numpy()).mean() <= MAX_FRAC
        # samples are regrouped by op inside the batch: each must come back exactly as if alone
        alone = apply_strong_batch(torch.from_numpy(batch[i:i + 1]), StrongBatch.from_draws(draws.take(slice(i, i + 1))),
                                   channels_last_input=True)
        assert torch.equal(alone[0], got[i]), i


def test_float_nchw_input_keeps_dtype_and_layout():
    x = torch.randint(0, 256, (4, 3, 24, 24)).float()
    p = draws_of([StrongParams(((1, 0.5), (11, 128.0)), 0.3, 0.5, 0.5)] * 4)
    y = apply_strong_batch(x, p)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y == torch.tensor([125.0, 123.0, 114.0]).view(1, 3, 1, 1)).all(1).any()  # Cutout is there


def test_chosen_ops_are_uniform_with_replacement_chi_square():
    n = 7000
    counts = np.zeros(len(STRONG_OPS))
    same = 0
    for i in range(n):
        p = strong_draws(5, 1, [i]).params(0)
        for k, _ in p.ops:
            counts[k] += 1
        same += p.ops[0][0] == p.ops[1][0]
    expected = 2 * n / len(STRONG_OPS)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 34.5  # chi-square, 13 degrees of freedom, p = 0.001
    # with replacement: both slots pick the same op with probability 1/14
    assert abs(same / n - 1 / 14) < 0.015


def test_empty_and_identity_only_batches_come_back_unchanged():
    empty = StrongBatch(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.float64),
                        torch.zeros(0, 3, dtype=torch.float64))
    assert apply_strong_batch(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), empty, channels_last_input=True).shape == \
        (0, 8, 8, 3)
    x = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    ident = draws_of([StrongParams(((5, 0.0), (5, 0.0)), 0.0, 0.5, 0.5)] * 3)  # Identity, no Cutout
    assert STRONG_OPS[5].name == "Identity" and torch.equal(apply_strong_batch(x, ident), x)
