"""Learning rate as a pure function of the global step (nanoGPT style)."""
import math


def base_lr(optim, global_batch: int) -> float:
    """optim.lr, linearly scaled to the global batch when optim.lr_ref_batch is set (Goyal et al.)."""
    return optim.lr * global_batch / optim.lr_ref_batch if optim.lr_ref_batch else optim.lr


def lr_at(step: int, steps_per_epoch: int, optim, base: float = None) -> float:
    """Step decay (x gamma at each milestone epoch) or cosine, after an optional linear warm-up.

    Milestones follow mdistiller: with 0-based epoch e, the LR is base * gamma ** #{m : e >= m}.
    `base` defaults to optim.lr (see `base_lr`).
    """
    base = optim.lr if base is None else base
    epoch_f = step / steps_per_epoch
    warm = optim.warmup_epochs
    if warm > 0 and epoch_f < warm:
        return base * (step + 1) / (warm * steps_per_epoch)
    if optim.schedule == "step":
        e = step // steps_per_epoch
        return base * optim.gamma ** sum(e >= m for m in optim.milestones)
    progress = (epoch_f - warm) / max(optim.epochs - warm, 1e-8)
    return optim.min_lr + 0.5 * (base - optim.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
