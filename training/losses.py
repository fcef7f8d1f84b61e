"""Distillation losses: CE, Hinton KD, DKD and CRLD, computed in float32 even under autocast; NKD, NormKD and MLKD
live in training/losses_baselines.py, and `method_loss` dispatches to all of them.

All KD-style terms are per-sample vectors internally so CRLD can gate them with its confidence
masks; teacher logits never receive gradients (they are detached here as well as produced under
inference mode by the loop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses_baselines import mlkd_loss, nkd_loss, nkd_per_sample, normkd_loss, normkd_per_sample


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): z-score each row."""
    return (logits - logits.mean(-1, keepdim=True)) / (eps + logits.std(-1, keepdim=True))


def _prep(student, teacher, logit_stand):
    s = student.float()
    t = teacher.detach().float()
    if logit_stand:
        s, t = standardize(s), standardize(t)
    return s, t


def kd_per_sample(log_p_s: torch.Tensor, log_p_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) per sample from log-probabilities at temperature T, times T^2."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature ** 2


def kd_loss(student, teacher, temperature: float, *, logit_stand: bool = False) -> torch.Tensor:
    """Hinton KD, batch mean of the per-sample KL times T^2."""
    s, t = _prep(student, teacher, logit_stand)
    return kd_per_sample(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                         temperature).mean()


def dkd_per_sample(student, teacher, target, *, alpha: float, beta: float, temperature: float,
                   logit_stand: bool = False) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD, per sample, times T^2."""
    s, t = _prep(student, teacher, logit_stand)
    gt = F.one_hot(target, s.shape[1]).bool()
    s, t = s / temperature, t / temperature
    log_ps, log_pt = F.log_softmax(s, 1), F.log_softmax(t, 1)
    # Binary (target vs rest) distributions, in log space for stability.
    def binary(logp):
        log_gt = logp.gather(1, target[:, None]).squeeze(1)  # masked_select would sync with the GPU (data-sized)
        log_rest = torch.logsumexp(logp.masked_fill(gt, float("-inf")), 1)
        return torch.stack([log_gt, log_rest], 1)
    bs, bt = binary(log_ps), binary(log_pt)
    tckd = (bt.exp() * (bt - bs)).sum(1)
    # Non-target distributions: the target class removed (mdistiller subtracts 1000 from it).
    ns = F.log_softmax(s.masked_fill(gt, float("-inf")), 1).masked_fill(gt, 0.0)
    nt = F.log_softmax(t.masked_fill(gt, float("-inf")), 1).masked_fill(gt, 0.0)
    nckd = (nt.exp() * (nt - ns)).sum(1)
    return (alpha * tckd + beta * nckd) * temperature ** 2


def dkd_loss(student, teacher, target, *, alpha, beta, temperature, logit_stand=False):
    return dkd_per_sample(student, teacher, target, alpha=alpha, beta=beta, temperature=temperature,
                          logit_stand=logit_stand).mean()


def dkd_warmup_factor(epoch: float, warmup: int) -> float:
    """mdistiller's DKD warm-up: min(epoch / warmup, 1), epoch counted from 1."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


def crld_loss(student_weak, student_strong, teacher_weak, teacher_strong, target, *, temperature: float,
              ce_weight: float, wv_weight: float, cv_weight: float, tau_w: float, tau_s: float,
              base: str = "kd", logit_stand: bool = False, dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
              base_scale: float = 1.0, nkd_temperature: float = 1.0, nkd_gamma: float = 1.5,
              normkd_t_norm: float = 2.0) -> dict:
    """CRLD (Zhang et al., ACM MM 2024), as in the paper's released code.

    kd_wv = wv_weight * mean((kd(s_w, t_w) + kd(s_s, t_s)) * [max softmax(t_w) >= tau_w])
    kd_cv = cv_weight * mean((kd(s_s, t_w) + kd(s_w, t_s)) * [max softmax(t_s) >= tau_s])
    The means divide by the batch size, not by the number of samples that pass the mask.
    `base='dkd'` swaps the pairwise term for DKD (`base_scale` carries its warm-up factor), `base='nkd'` for
    NKD at `nkd_temperature`, `base='normkd'` for NormKD; `temperature` is then unused except by DKD.
    Also returns the gates' pass rates (`mask_w_rate`, `mask_s_rate`), which the trainer logs.
    """
    s_w, t_w = _prep(student_weak, teacher_weak, False)
    s_s, t_s = _prep(student_strong, teacher_strong, False)
    ce = ce_weight * (F.cross_entropy(s_w, target) + F.cross_entropy(s_s, target))
    # Masks use the raw teacher logits at T=1, whatever the KD temperature / standardisation.
    mask_w, mask_s = (m.float() for m in crld_masks(t_w, t_s, tau_w, tau_s))
    if base == "kd":
        if logit_stand:
            s_w, s_s, t_w, t_s = map(standardize, (s_w, s_s, t_w, t_s))
        # Each log-softmax once, reused by the four pairings.
        ls_w, ls_s = F.log_softmax(s_w / temperature, 1), F.log_softmax(s_s / temperature, 1)
        lt_w, lt_s = F.log_softmax(t_w / temperature, 1), F.log_softmax(t_s / temperature, 1)
        pair = lambda ls, lt: kd_per_sample(ls, lt, temperature)  # noqa: E731
    elif base == "dkd":
        ls_w, ls_s, lt_w, lt_s = s_w, s_s, t_w, t_s
        pair = lambda s, t: dkd_per_sample(s, t, target, alpha=dkd_alpha, beta=dkd_beta,  # noqa: E731
                                           temperature=temperature, logit_stand=logit_stand)
    elif base in ("nkd", "normkd") and not logit_stand:
        ls_w, ls_s, lt_w, lt_s = s_w, s_s, t_w, t_s
        if base == "nkd":
            pair = lambda s, t: nkd_per_sample(s, t, target, temperature=nkd_temperature,  # noqa: E731
                                               gamma=nkd_gamma)
        else:
            pair = lambda s, t: normkd_per_sample(s, t, t_norm=normkd_t_norm)  # noqa: E731
    else:
        raise ValueError(f"CRLD base loss '{base}' with logit_stand={logit_stand} is not defined "
                         f"(kd | dkd, or nkd | normkd without logit_stand)")
    kd_wv = wv_weight * base_scale * ((pair(ls_w, lt_w) + pair(ls_s, lt_s)) * mask_w).mean()
    kd_cv = cv_weight * base_scale * ((pair(ls_s, lt_w) + pair(ls_w, lt_s)) * mask_s).mean()
    return {"loss": ce + kd_wv + kd_cv, "ce": ce, "kd_wv": kd_wv, "kd_cv": kd_cv,
            "mask_w_rate": mask_w.mean(), "mask_s_rate": mask_s.mean()}


def crld_masks(teacher_weak, teacher_strong, tau_w: float, tau_s: float):
    """The two confidence gates, as bool vectors."""
    mask_w = F.softmax(teacher_weak.detach().float(), 1).amax(1) >= tau_w
    mask_s = F.softmax(teacher_strong.detach().float(), 1).amax(1) >= tau_s
    return mask_w, mask_s


# Methods that train on the weak and the strong view; the rest skip the strong view (their weak view is the same).
TWO_VIEW_METHODS = ("crld", "mlkd")


def distillation_term(method) -> str:
    """The term a method config distils with: CRLD's pairwise term (`method.base`), else the method itself."""
    return method.base if method.name == "crld" else method.name


def views_needed(method: str) -> int:
    """Views a method trains on (1 or 2): what its loader must build."""
    return 2 if method in TWO_VIEW_METHODS else 1


def method_loss(method, s_w, s_s, t_w, t_s, target, epoch: int) -> dict:
    """The configured objective. Single-view methods (ce, kd, dkd, nkd, normkd) use the weak view only."""
    name = method.name
    if name == "crld":
        scale = dkd_warmup_factor(epoch, method.dkd_warmup) if method.base == "dkd" else 1.0
        return crld_loss(s_w, s_s, t_w, t_s, target, temperature=method.temperature,
                         ce_weight=method.ce_weight, wv_weight=method.wv_weight,
                         cv_weight=method.cv_weight, tau_w=method.tau_w, tau_s=method.tau_s,
                         base=method.base, logit_stand=method.logit_stand, dkd_alpha=method.dkd_alpha,
                         dkd_beta=method.dkd_beta, base_scale=scale, nkd_temperature=method.nkd_temperature,
                         nkd_gamma=method.nkd_gamma, normkd_t_norm=method.normkd_t_norm)
    if name == "mlkd":
        return mlkd_loss(s_w, s_s, t_w, t_s, target, temperatures=(method.temperature, *method.mlkd_temperatures),
                         ce_weight=method.ce_weight, kd_weight=method.kd_weight)
    ce = method.ce_weight * F.cross_entropy(s_w.float(), target)
    if name == "ce":
        return {"loss": ce, "ce": ce}
    if name == "kd":
        kd = method.kd_weight * kd_loss(s_w, t_w, method.temperature, logit_stand=method.logit_stand)
        return {"loss": ce + kd, "ce": ce, "kd": kd}
    if name == "dkd":
        dkd = dkd_warmup_factor(epoch, method.dkd_warmup) * dkd_loss(
            s_w, t_w, target, alpha=method.dkd_alpha, beta=method.dkd_beta,
            temperature=method.temperature, logit_stand=method.logit_stand)
        return {"loss": ce + dkd, "ce": ce, "dkd": dkd}
    if name == "nkd":
        nkd = method.kd_weight * nkd_loss(s_w, t_w, target, temperature=method.nkd_temperature,
                                          gamma=method.nkd_gamma)
        return {"loss": ce + nkd, "ce": ce, "nkd": nkd}
    if name == "normkd":
        normkd = method.kd_weight * normkd_loss(s_w, t_w, t_norm=method.normkd_t_norm)
        return {"loss": ce + normkd, "ce": ce, "normkd": normkd}
    raise ValueError(f"unknown method '{name}'")
