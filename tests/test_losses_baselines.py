"""NKD, NormKD, MLKD (alone and as CRLD's pairwise term) against float64 NumPy references written from the
formulas, row by row; their dispatch from a loaded config; the combinations the config refuses."""
import numpy as np
import pytest
import torch

from training.config import ConfigError, load_config
from training.losses import crld_loss, method_loss, views_needed
from training.losses_baselines import mlkd_gates, mlkd_loss, nkd_loss, normkd_loss


def log_softmax(v):
    """One row, float64."""
    m = v.max()
    return v - m - np.log(np.exp(v - m).sum())


def softmax(v):
    return np.exp(log_softmax(v))


def kl(t_row, s_row):
    lt, ls = log_softmax(t_row), log_softmax(s_row)
    return (np.exp(lt) * (lt - ls)).sum()


def ce_ref(s, y):
    return np.mean([-log_softmax(s[i])[y[i]] for i in range(len(y))])


def nkd_ref(s, t, y, T, gamma):
    out = []
    for i in range(len(y)):
        target = -softmax(t[i])[y[i]] * log_softmax(s[i])[y[i]]
        s_nt, t_nt = np.delete(s[i], y[i]) / T, np.delete(t[i], y[i]) / T  # the target class removed
        non_target = -(softmax(t_nt) * log_softmax(s_nt)).sum()
        out.append(target + gamma * T * T * non_target)
    return np.array(out)


def normkd_ref(s, t, t_norm):
    out = []
    for i in range(len(s)):
        tau_s, tau_t = t_norm * np.std(s[i], ddof=1), t_norm * np.std(t[i], ddof=1)
        out.append(kl(t[i] / tau_t, s[i] / tau_s) * tau_t ** 2)
    return np.array(out)


def mlkd_ref(sw, ss, tw, ts, y, temps, ce_w, kd_w):
    b, c = sw.shape
    p = np.stack([softmax(r) for r in tw])
    conf, class_conf = p.max(1), p.sum(0)
    gate = conf <= np.percentile(conf, 50)
    class_gate = class_conf <= np.percentile(class_conf, 50)
    ce = ce_w * (ce_ref(sw, y) + ce_ref(ss, y))
    kd = cc = bc = 0.0
    for T in temps:
        for i in range(b):
            kd += (gate[i] * kl(tw[i] / T, sw[i] / T) + kl(ts[i] / T, ss[i] / T)) * T * T / b
        ps = np.stack([softmax(r / T) for r in sw])
        pt = np.stack([softmax(r / T) for r in tw])
        d_class, d_batch = pt.T @ pt - ps.T @ ps, pt @ pt.T - ps @ ps.T
        cc += sum((d_class[k] ** 2).sum() for k in range(c) if class_gate[k]) / c
        bc += sum((d_batch[i] ** 2).sum() for i in range(b) if gate[i]) / b
    kd, cc, bc = kd_w * kd, kd_w * cc, kd_w * bc
    return {"loss": ce + kd + cc + bc, "ce": ce, "kd": kd, "cc": cc, "bc": bc}


def crld_pair_ref(sw, ss, tw, ts, y, pair, ce_w, wv_w, cv_w, tau_w, tau_s):
    mw = np.array([softmax(r).max() >= tau_w for r in tw], dtype=np.float64)
    ms = np.array([softmax(r).max() >= tau_s for r in ts], dtype=np.float64)
    ce = ce_w * (ce_ref(sw, y) + ce_ref(ss, y))
    wv = wv_w * ((pair(sw, tw) + pair(ss, ts)) * mw).sum() / len(y)
    cv = cv_w * ((pair(ss, tw) + pair(sw, ts)) * ms).sum() / len(y)
    return {"loss": ce + wv + cv, "ce": ce, "kd_wv": wv, "kd_cv": cv}


def rand_logits(n=12, c=10, scale=3.0, seed=0):
    g = np.random.default_rng(seed)
    return [g.normal(0, scale, (n, c)) for _ in range(4)] + [g.integers(0, c, n)]


def extreme_logits(seed=1):
    """Students and strong-view teacher with +-100 spreads, a dominant class and 1e3 logits. The weak-view
    teacher, whose confidences the gates rank, stays unsaturated: at confidence 1 - 1e-8 float32 rounds rows
    to ties at 1.0 that float64 tells apart, and the gates would differ for that reason alone."""
    sw, ss, tw, ts, y = rand_logits(scale=40.0, seed=seed)
    tw /= 8.0
    ts[np.arange(len(y)), y] += 60.0
    sw[0, 3], ss[2, 5], ts[1, y[1]] = 1e3, -1e3, -1e3
    return sw, ss, tw, ts, y


def f32(*arrays):
    return [torch.tensor(a, dtype=torch.float32) for a in arrays]


def close(got: dict, ref: dict, rtol=1e-5, atol=1e-5):
    for key, r in ref.items():
        assert got[key].dtype == torch.float32, key
        np.testing.assert_allclose(got[key].item(), r, rtol=rtol, atol=atol, err_msg=key)


CASES = [("random", rand_logits, 1e-5), ("extreme", extreme_logits, 1e-4)]


@pytest.mark.parametrize("name,make,rtol", CASES)
@pytest.mark.parametrize("T,gamma", [(1.0, 1.5), (3.0, 0.5)])
def test_nkd_matches_reference(name, make, rtol, T, gamma):
    s, _, _, t, y = make()
    got = nkd_loss(*f32(s, t), torch.tensor(y), temperature=T, gamma=gamma)
    np.testing.assert_allclose(got.item(), nkd_ref(s, t, y, T, gamma).mean(), rtol=rtol)


@pytest.mark.parametrize("name,make,rtol", CASES)
@pytest.mark.parametrize("t_norm", [2.0, 1.0])
def test_normkd_matches_reference(name, make, rtol, t_norm):
    s, _, _, t, _ = make()
    got = normkd_loss(*f32(s, t), t_norm=t_norm)
    np.testing.assert_allclose(got.item(), normkd_ref(s, t, t_norm).mean(), rtol=rtol)


@pytest.mark.parametrize("name,make,rtol", CASES)
def test_mlkd_matches_reference(name, make, rtol):
    sw, ss, tw, ts, y = make()
    temps, ce_w, kd_w = (4.0, 3.0, 5.0, 2.0, 6.0), 0.1, 0.9
    got = mlkd_loss(*f32(sw, ss, tw, ts), torch.tensor(y), temperatures=temps, ce_weight=ce_w, kd_weight=kd_w)
    close(got, mlkd_ref(sw, ss, tw, ts, y, temps, ce_w, kd_w), rtol=rtol)


def test_mlkd_gates_pick_samples_not_a_batch_fraction():
    sw, ss, tw, ts, y = rand_logits(seed=3)
    gate, class_gate = mlkd_gates(torch.tensor(tw))
    assert gate.sum().item() == len(y) // 2 and class_gate.sum().item() == tw.shape[1] // 2
    kw = dict(temperatures=(4.0,), ce_weight=1.0, kd_weight=1.0)
    base = mlkd_loss(*f32(sw, ss, tw, ts), torch.tensor(y), **kw)["kd"].item()
    for i, inside in ((int(gate.argmin()), False), (int(gate.argmax()), True)):
        moved = sw.copy()
        moved[i] += np.linspace(-5, 5, sw.shape[1])
        kd = mlkd_loss(*f32(moved, ss, tw, ts), torch.tensor(y), **kw)["kd"].item()
        # a sample the gate leaves out adds nothing to the weak view's instance term
        assert (abs(kd - base) > 1e-3) == inside


@pytest.mark.parametrize("base,pair", [
    ("nkd", lambda s, t, y: nkd_ref(s, t, y, 2.0, 1.5)),
    ("normkd", lambda s, t, y: normkd_ref(s, t, 2.0)),
])
@pytest.mark.parametrize("name,make,rtol", CASES)
def test_crld_with_baseline_base_matches_reference(base, pair, name, make, rtol):
    sw, ss, tw, ts, y = make()
    out = crld_loss(*f32(sw, ss, tw, ts), torch.tensor(y), temperature=4.0, ce_weight=1.0, wv_weight=2.0,
                    cv_weight=0.5, tau_w=0.7, tau_s=0.3, base=base, nkd_temperature=2.0, nkd_gamma=1.5,
                    normkd_t_norm=2.0)
    ref = crld_pair_ref(sw, ss, tw, ts, y, lambda s, t: pair(s, t, y), 1.0, 2.0, 0.5, 0.7, 0.3)
    close(out, ref, rtol=rtol)


def test_crld_reference_cases_gate_partially():
    for make in (rand_logits, extreme_logits):
        _, _, tw, ts, _ = make()
        pw, ps = (np.array([softmax(r).max() for r in t]) for t in (tw, ts))
        assert 0 < (pw >= 0.7).sum() < len(pw) or 0 < (ps >= 0.3).sum() < len(ps)


def _grad_case(seed=7):
    sw, ss, tw, ts, y = rand_logits(seed=seed)
    return [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (sw, ss, tw, ts)], torch.tensor(y)


@pytest.mark.parametrize("overrides", [["method.name=nkd"], ["method.name=normkd"], ["method.name=mlkd"],
                                       ["method.base=nkd", "method.tau_w=0", "method.tau_s=0"],
                                       ["method.base=normkd", "method.tau_w=0", "method.tau_s=0"]])
def test_gradient_reaches_only_the_student(overrides):
    method = load_config(None, overrides).method
    (sw, ss, tw, ts), y = _grad_case()
    method_loss(method, sw, ss, tw, ts, y, epoch=1)["loss"].backward()
    two = views_needed(method.name) == 2
    assert sw.grad is not None and sw.grad.abs().sum() > 0 and torch.isfinite(sw.grad).all()
    assert (ss.grad is not None and ss.grad.abs().sum() > 0) if two else ss.grad is None
    assert tw.grad is None and ts.grad is None


def test_method_loss_dispatch_from_config():
    sw, ss, tw, ts, y = rand_logits(seed=21)
    args = [*f32(sw, ss, tw, ts), torch.tensor(y)]
    m = load_config(None, ["method.name=nkd", "method.nkd_temperature=2", "method.nkd_gamma=0.5",
                           "method.ce_weight=0.7", "method.kd_weight=0.4"]).method
    nkd = 0.4 * nkd_ref(sw, tw, y, 2.0, 0.5).mean()
    close(method_loss(m, *args, epoch=1), {"ce": 0.7 * ce_ref(sw, y), "nkd": nkd, "loss": 0.7 * ce_ref(sw, y) + nkd})
    m = load_config(None, ["method.name=normkd", "method.normkd_t_norm=1", "method.ce_weight=0.5",
                           "method.kd_weight=0.5"]).method
    normkd = 0.5 * normkd_ref(sw, tw, 1.0).mean()
    close(method_loss(m, *args, epoch=1), {"normkd": normkd, "loss": 0.5 * ce_ref(sw, y) + normkd})
    m = load_config(None, ["method.name=mlkd", "method.temperature=1", "method.mlkd_temperatures=[3,2]",
                           "method.ce_weight=0.5", "method.kd_weight=0.5"]).method
    close(method_loss(m, *args, epoch=1), mlkd_ref(sw, ss, tw, ts, y, (1.0, 3.0, 2.0), 0.5, 0.5))
    m = load_config(None, ["method.base=nkd", "method.tau_w=0.5", "method.tau_s=0.1"]).method
    ref = crld_pair_ref(sw, ss, tw, ts, y, lambda s, t: nkd_ref(s, t, y, 1.0, 1.5), 1.0, 2.0, 0.5, 0.5, 0.1)
    close(method_loss(m, *args, epoch=1), ref)


def test_defaults_and_views():
    m = load_config(None, []).method
    assert (m.nkd_temperature, m.nkd_gamma, m.normkd_t_norm, list(m.mlkd_temperatures)) == \
        (1.0, 1.5, 2.0, [3.0, 5.0, 2.0, 6.0])
    assert [views_needed(n) for n in ("nkd", "normkd", "mlkd", "crld", "kd")] == [1, 1, 2, 2, 1]


def test_computed_in_float32_under_autocast():
    sw, ss, tw, ts, y = rand_logits(seed=9)
    bf = [torch.tensor(a).to(torch.bfloat16) for a in (sw, ss, tw, ts)]
    for overrides in (["method.name=nkd"], ["method.name=normkd"], ["method.name=mlkd"], ["method.base=normkd"]):
        m = load_config(None, overrides).method
        plain = method_loss(m, *bf, torch.tensor(y), epoch=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = method_loss(m, *bf, torch.tensor(y), epoch=1)
        for key, v in auto.items():
            assert v.dtype == torch.float32, (overrides, key)
            # the Gram products too: bf16 matrix products would move cc / bc by far more than 1e-5
            np.testing.assert_allclose(v.item(), plain[key].item(), rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("overrides,key", [
    (["method.base=mlkd"], "method.base"),
    (["method.name=kd", "method.base=mlkd"], "method.base"),
    (["method.name=nkd", "method.logit_stand=true"], "method.logit_stand"),
    (["method.name=normkd", "method.logit_stand=true"], "method.logit_stand"),
    (["method.name=mlkd", "method.logit_stand=true"], "method.logit_stand"),
    (["method.base=nkd", "method.logit_stand=true"], "method.logit_stand"),
    (["method.base=normkd", "method.logit_stand=true"], "method.logit_stand"),
    (["method.mlkd_temperatures=[2,0]"], "method.mlkd_temperatures"),
    (["method.normkd_t_norm=0"], "method.normkd_t_norm"),
])
def test_undefined_combinations_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=rf"'{key}'") as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_logit_stand_still_allowed_where_defined():
    for overrides in (["method.name=kd"], ["method.name=dkd"], ["method.base=dkd"], []):
        assert load_config(None, overrides + ["method.logit_stand=true"]).method.logit_stand
