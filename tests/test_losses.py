"""Losses against independent float64 NumPy references written from the papers' formulas."""
import numpy as np
import pytest
import torch

from training.losses import crld_loss, dkd_loss, kd_loss


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def kd_ref(s, t, T):
    ps, pt = softmax(s / T), softmax(t / T)
    return (pt * (np.log(pt) - np.log(ps))).sum(1) * T * T


def ce_ref(s, y):
    return -np.log(softmax(s)[np.arange(len(y)), y]).mean()


def crld_ref(sw, ss, tw, ts, y, T, ce_w, wv_w, cv_w, tau_w, tau_s):
    mw = (softmax(tw).max(1) >= tau_w).astype(np.float64)
    ms = (softmax(ts).max(1) >= tau_s).astype(np.float64)
    ce = ce_w * (ce_ref(sw, y) + ce_ref(ss, y))
    wv = wv_w * ((kd_ref(sw, tw, T) + kd_ref(ss, ts, T)) * mw).sum() / len(y)
    cv = cv_w * ((kd_ref(ss, tw, T) + kd_ref(sw, ts, T)) * ms).sum() / len(y)
    return ce + wv + cv, ce, wv, cv


def dkd_ref(s, t, y, alpha, beta, T):
    """mdistiller's formulation: binary target/rest KL + non-target KL via a -1000 logit shift."""
    gt = np.zeros_like(s)
    gt[np.arange(len(y)), y] = 1
    ps, pt = softmax(s / T), softmax(t / T)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum() * T * T / len(y)
    pt2 = softmax(t / T - 1000.0 * gt)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls2 = np.log(softmax(s / T - 1000.0 * gt))
        term = np.where(pt2 > 0, pt2 * (np.log(pt2) - ls2), 0.0)
    nckd = term.sum() * T * T / len(y)
    return alpha * tckd + beta * nckd


def rand_logits(n=16, c=10, scale=3.0, seed=0):
    g = np.random.default_rng(seed)
    return [g.normal(0, scale, (n, c)) for _ in range(4)] + [g.integers(0, c, n)]


@pytest.mark.parametrize("T,ce_w,wv_w,cv_w,tau_w,tau_s,scale", [
    (4.0, 1.0, 2.0, 0.5, 0.9, 0.2, 3.0),
    (1.0, 2.0, 1.0, 1.0, 0.5, 0.5, 2.0),
    (2.0, 1.0, 4.0, 1.0, 0.7, 0.3, 5.0),
    (8.0, 0.5, 1.5, 0.25, 0.95, 0.05, 8.0),
])
def test_crld_matches_float64_reference(T, ce_w, wv_w, cv_w, tau_w, tau_s, scale):
    sw, ss, tw, ts, y = rand_logits(scale=scale, seed=int(T * 10))
    out = crld_loss(*(torch.tensor(a, dtype=torch.float32) for a in (sw, ss, tw, ts)), torch.tensor(y),
                    temperature=T, ce_weight=ce_w, wv_weight=wv_w, cv_weight=cv_w, tau_w=tau_w, tau_s=tau_s)
    assert set(out) == {"loss", "ce", "kd_wv", "kd_cv", "mask_w_rate", "mask_s_rate"}
    ref = crld_ref(sw, ss, tw, ts, y, T, ce_w, wv_w, cv_w, tau_w, tau_s)
    # the pass rates the trainer logs are those of the gates the loss applied
    for key, t, tau in (("mask_w_rate", tw, tau_w), ("mask_s_rate", ts, tau_s)):
        assert out[key].item() == pytest.approx((softmax(t).max(1) >= tau).mean(), abs=1e-6)
    for key, r in zip(("loss", "ce", "kd_wv", "kd_cv"), ref):
        assert out[key].dtype == torch.float32
        np.testing.assert_allclose(out[key].item(), r, rtol=1e-5, atol=1e-6)


def test_crld_masks_gate_partially():
    """The test data must exercise partial masks, or the reference comparison proves little."""
    sw, ss, tw, ts, y = rand_logits(scale=3.0, seed=40)
    pw, ps = softmax(tw).max(1), softmax(ts).max(1)
    assert 0 < (pw >= 0.9).sum() < len(y) or 0 < (ps >= 0.2).sum() < len(y)


def test_crld_mask_edges_all_and_none():
    sw, ss, tw, ts, y = rand_logits(seed=3)
    args = [torch.tensor(a, dtype=torch.float32) for a in (sw, ss, tw, ts)] + [torch.tensor(y)]
    kw = dict(temperature=4.0, ce_weight=1.0, wv_weight=2.0, cv_weight=0.5)
    none = crld_loss(*args, tau_w=1.0, tau_s=1.0, **kw)  # nothing reaches confidence 1.0
    assert none["kd_wv"].item() == 0.0 and none["kd_cv"].item() == 0.0
    allp = crld_loss(*args, tau_w=0.0, tau_s=0.0, **kw)
    ref = crld_ref(sw, ss, tw, ts, y, 4.0, 1.0, 2.0, 0.5, 0.0, 0.0)
    np.testing.assert_allclose(allp["kd_wv"].item(), ref[2], rtol=1e-5)
    # With every sample passing, the gated mean equals the plain mean of the pairwise KD terms.
    plain = 2.0 * (kd_ref(sw, tw, 4.0) + kd_ref(ss, ts, 4.0)).mean()
    np.testing.assert_allclose(allp["kd_wv"].item(), plain, rtol=1e-5)


def test_mean_divides_by_batch_not_mask_count():
    sw, ss, tw, ts, y = rand_logits(n=8, seed=5)
    tw[0] = 0.0
    tw[0, y[0]] = 50.0  # exactly one confident weak-view teacher row
    tw[1:] = 0.0        # the rest are uniform: confidence 0.1 < tau_w
    out = crld_loss(*(torch.tensor(a, dtype=torch.float32) for a in (sw, ss, tw, ts)), torch.tensor(y),
                    temperature=4.0, ce_weight=1.0, wv_weight=1.0, cv_weight=0.0, tau_w=0.9, tau_s=0.2)
    one = kd_ref(sw[:1], tw[:1], 4.0)[0] + kd_ref(ss[:1], ts[:1], 4.0)[0]
    np.testing.assert_allclose(out["kd_wv"].item(), one / 8, rtol=1e-5)


def test_gradient_reaches_only_the_student():
    sw, ss, tw, ts, y = (torch.tensor(a, dtype=torch.float32, requires_grad=True) if i < 4 else torch.tensor(a)
                         for i, a in enumerate(rand_logits(seed=7)))
    out = crld_loss(sw, ss, tw, ts, y, temperature=4.0, ce_weight=1.0, wv_weight=2.0, cv_weight=0.5,
                    tau_w=0.0, tau_s=0.0)
    out["loss"].backward()
    assert sw.grad is not None and sw.grad.abs().sum() > 0
    assert ss.grad is not None and ss.grad.abs().sum() > 0
    assert tw.grad is None and ts.grad is None


def test_computed_in_float32_under_bf16_inputs():
    sw, ss, tw, ts, y = rand_logits(seed=9)
    out = crld_loss(*(torch.tensor(a).to(torch.bfloat16) for a in (sw, ss, tw, ts)), torch.tensor(y),
                    temperature=4.0, ce_weight=1.0, wv_weight=2.0, cv_weight=0.5, tau_w=0.5, tau_s=0.2)
    assert all(v.dtype == torch.float32 for v in out.values())


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_reference(T):
    s, t, _, _, _ = rand_logits(seed=11)
    got = kd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), T)
    np.testing.assert_allclose(got.item(), kd_ref(s, t, T).mean(), rtol=1e-5)


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_reference(alpha, beta, T):
    s, t, _, _, y = rand_logits(seed=13)
    got = dkd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.tensor(y),
                   alpha=alpha, beta=beta, temperature=T)
    np.testing.assert_allclose(got.item(), dkd_ref(s, t, y, alpha, beta, T), rtol=1e-4)


def test_crld_with_dkd_base_uses_dkd_pairs():
    sw, ss, tw, ts, y = rand_logits(seed=17)
    out = crld_loss(*(torch.tensor(a, dtype=torch.float32) for a in (sw, ss, tw, ts)), torch.tensor(y),
                    temperature=4.0, ce_weight=1.0, wv_weight=1.0, cv_weight=1.0, tau_w=0.0, tau_s=0.0,
                    base="dkd", dkd_alpha=1.0, dkd_beta=8.0)
    want = dkd_ref(sw, tw, y, 1, 8, 4) + dkd_ref(ss, ts, y, 1, 8, 4)
    np.testing.assert_allclose(out["kd_wv"].item(), want, rtol=1e-4)


def test_logit_standardisation_changes_kd_only_when_asked():
    s, t, _, _, _ = rand_logits(seed=19)
    a = kd_loss(torch.tensor(s), torch.tensor(t), 2.0)
    b = kd_loss(torch.tensor(s), torch.tensor(t), 2.0, logit_stand=True)
    z = lambda x: (x - x.mean(1, keepdims=True)) / (1e-7 + x.std(1, ddof=1, keepdims=True))  # noqa: E731
    np.testing.assert_allclose(b.item(), kd_ref(z(s), z(t), 2.0).mean(), rtol=1e-5)
    assert abs(a.item() - b.item()) > 1e-3
