"""Learning rate as a pure function of the global step (nanoGPT style)."""
import math


def lr_at(step: int, steps_per_epoch: int, optim) -> float:
    """Step decay (x gamma at each milestone epoch) or cosine, after an optional linear warm-up.

    Milestones follow mdistiller: with 0-based epoch e, the LR is base * gamma ** #{m : e >= m}.
    """
    base = optim.lr
    epoch_f = step / steps_per_epoch
    warm = optim.warmup_epochs
    if warm > 0 and epoch_f < warm:
        return base * (step + 1) / (warm * steps_per_epoch)
    if optim.schedule == "step":
        e = step // steps_per_epoch
        return base * optim.gamma ** sum(e >= m for m in optim.milestones)
    progress = (epoch_f - warm) / max(optim.epochs - warm, 1e-8)
    return optim.min_lr + 0.5 * (base - optim.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
