"""Logit-distillation baselines: NKD, NormKD and MLKD, computed in float32 even under autocast.

Settings and every difference from the CRLD authors' released code (scx-822/CRLD-main, an mdistiller fork):
docs/design.md, "Baselines: NKD, NormKD, MLKD". NKD and NormKD are per-sample vectors (`*_per_sample`) so that
CRLD can use them as its pairwise term (`method.base`); MLKD's class- and batch-correlation terms compare whole
batch Gram matrices and have no per-sample value, so it is a method of its own only.
No function here reads a tensor on the host: the gates are device tensors, the medians `torch.quantile`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# A row of equal logits has std 0; NormKD divides by it (the released code gives NaN there).
_STD_FLOOR = 1e-7


def _fp32(student, teacher):
    return student.float(), teacher.detach().float()


def _no_autocast(x: torch.Tensor):
    """Matrix products would run in bf16/fp16 under autocast; the Gram terms need float32."""
    return torch.autocast(x.device.type, enabled=False)


def nkd_per_sample(student, teacher, target, *, temperature: float, gamma: float) -> torch.Tensor:
    """NKD (Yang et al., ICCV 2023), per sample:
    -p_t[y] log p_s[y] (both at T=1) - gamma T^2 sum_{c != y} q_t[c] log q_s[c],
    q = softmax over the non-target logits at T (the paper's renormalised non-target probabilities)."""
    s, t = _fp32(student, teacher)
    y = target[:, None]
    target_term = -(F.softmax(t, 1).gather(1, y) * F.log_softmax(s, 1).gather(1, y)).squeeze(1)
    gt = F.one_hot(target, s.shape[1]).bool()
    # The target column at -inf gets probability 0; its log is zeroed so 0 * log 0 reads 0, not NaN.
    log_qs = F.log_softmax(s.masked_fill(gt, float("-inf")) / temperature, 1).masked_fill(gt, 0.0)
    qt = F.softmax(t.masked_fill(gt, float("-inf")) / temperature, 1)
    non_target = -(qt * log_qs).sum(1)
    return target_term + gamma * temperature ** 2 * non_target


def nkd_loss(student, teacher, target, *, temperature: float, gamma: float) -> torch.Tensor:
    return nkd_per_sample(student, teacher, target, temperature=temperature, gamma=gamma).mean()


def normkd_per_sample(student, teacher, *, t_norm: float) -> torch.Tensor:
    """NormKD (Chi et al., 2023), per sample: KL(softmax(z_t / tau_t) || softmax(z_s / tau_s)) * tau_t^2 with
    tau = t_norm * std over classes of each row's own logits (unbiased, as torch.std), teacher and student apart."""
    s, t = _fp32(student, teacher)
    tau_s = t_norm * s.std(1, keepdim=True).clamp_min(_STD_FLOOR)
    tau_t = t_norm * t.std(1, keepdim=True).clamp_min(_STD_FLOOR)
    log_ps, log_pt = F.log_softmax(s / tau_s, 1), F.log_softmax(t / tau_t, 1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(1) * tau_t.squeeze(1) ** 2


def normkd_loss(student, teacher, *, t_norm: float) -> torch.Tensor:
    return normkd_per_sample(student, teacher, t_norm=t_norm).mean()


def mlkd_gates(teacher_weak):
    """MLKD's confidence gates from the weak-view teacher at T=1, as float vectors: samples whose top
    probability, and classes whose probability summed over the batch, are at most the median (linear
    interpolation between the two middle values, as numpy's percentile in the released code)."""
    p = F.softmax(teacher_weak.detach().float(), 1)
    conf, class_conf = p.amax(1), p.sum(0)
    sample_gate = conf <= torch.quantile(conf, 0.5)
    class_gate = class_conf <= torch.quantile(class_conf, 0.5)
    return sample_gate.float(), class_gate.float()


def mlkd_loss(student_weak, student_strong, teacher_weak, teacher_strong, target, *,
              temperatures: Sequence[float], ce_weight: float, kd_weight: float) -> dict:
    """MLKD (Jin et al., CVPR 2023), over the prediction-augmentation temperatures:

    ce = ce_weight * (CE(s_w) + CE(s_s))
    kd = kd_weight * sum_T [ mean_i(g_i KL_T(t_w,i || s_w,i)) + mean_i(KL_T(t_s,i || s_s,i)) ]   (KL_T times T^2)
    cc = kd_weight * sum_T sum_{k,l} c_k (M_t - M_s)_{kl}^2 / C,   M = P^T P  (C x C, weak view, P at T)
    bc = kd_weight * sum_T sum_{i,j} g_i (G_t - G_s)_{ij}^2 / B,   G = P P^T  (B x B, weak view)
    g, c: `mlkd_gates`, applied per sample / per class (row of the Gram matrix); means divide by B.
    """
    b, c = student_weak.shape
    with _no_autocast(student_weak):
        s_w, t_w = _fp32(student_weak, teacher_weak)
        s_s, t_s = _fp32(student_strong, teacher_strong)
        g, cls = mlkd_gates(t_w)
        ce = ce_weight * (F.cross_entropy(s_w, target) + F.cross_entropy(s_s, target))
        kd = cc = bc = s_w.new_zeros(())
        for temp in temperatures:
            ls_w, lt_w = F.log_softmax(s_w / temp, 1), F.log_softmax(t_w / temp, 1)
            ls_s, lt_s = F.log_softmax(s_s / temp, 1), F.log_softmax(t_s / temp, 1)
            kl_w = (lt_w.exp() * (lt_w - ls_w)).sum(1) * temp ** 2
            kl_s = (lt_s.exp() * (lt_s - ls_s)).sum(1) * temp ** 2
            kd = kd + (kl_w * g).mean() + kl_s.mean()
            ps, pt = ls_w.exp(), lt_w.exp()
            cc = cc + ((pt.T @ pt - ps.T @ ps) ** 2 * cls[:, None]).sum() / c
            bc = bc + ((pt @ pt.T - ps @ ps.T) ** 2 * g[:, None]).sum() / b
        kd, cc, bc = kd_weight * kd, kd_weight * cc, kd_weight * bc
    return {"loss": ce + kd + cc + bc, "ce": ce, "kd": kd, "cc": cc, "bc": bc}
