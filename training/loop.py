"""The training loop: one small readable `Trainer` for ce / kd / dkd / crld.

The teacher is frozen, in eval mode, never wrapped, and runs once per step on both views
concatenated under `torch.inference_mode()`. The student runs the two views as two forwards (BN
statistics per view, as the paper) unless `method.joint_forward`. The hot loop has no host syncs
except every `run.log_every` steps, where progress and the non-finite check are read.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from pipelines.errors import RuntimeConfigError, UserError
from training.checkpoint import CheckpointError, atomic_save, load_model_weights, safe_load
from training.hub_weights import weights_path
from training.losses import method_loss
from training.models import create_model
from training.progress import progress
from training.runtime import autocast_for, rng_state, set_rng_state
from training.schedule import base_lr, lr_at
from training.teacher_cache import TeacherCache, file_sha256, fingerprint, read_meta

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """A loss turned NaN or infinite: the configured learning rate or precision does not train."""


def frozen_teacher(cfg, device):
    """The teacher in eval mode, without gradients, in the run's memory format; never wrapped in DDP."""
    teacher = create_model(cfg.teacher.name, cfg.data.num_classes)
    load_model_weights(teacher, cfg.teacher.ckpt, cfg.teacher.name)
    mf = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    return teacher.to(device, memory_format=mf).eval().requires_grad_(False)


def open_cache(cfg, train_source, device):
    """The checked teacher cache for this run (the teacher model is never built). Storage precision
    and k are the cache's own choice; everything that decides the views and the teacher is checked."""
    fp = (read_meta(cfg.teacher.cache) or {}).get("fingerprint") or {}
    precision, topk = fp.get("precision"), fp.get("topk")
    if topk and cfg.method.logit_stand:
        raise RuntimeConfigError(f"{cfg.teacher.cache}: a top-{topk} cache cannot serve method.logit_stand=true "
                                 f"(standardisation needs every logit); build a full cache")
    sha = file_sha256(weights_path(cfg.teacher.ckpt, cfg.teacher.name)) if cfg.teacher.ckpt else None
    wanted = fingerprint(cfg, train_source, precision=precision, topk=topk, teacher_sha=sha, device=device)
    return TeacherCache(cfg.teacher.cache, wanted, cfg.optim.epochs, cfg.teacher.cache_cycle, device)


def build_optimizer(params, optim, device: torch.device):
    kw = dict(lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    impl = optim.impl
    if impl == "apex":
        try:
            from apex.optimizers import FusedSGD  # NVIDIA apex, only when already installed
        except ImportError:
            raise RuntimeConfigError("optim.impl=apex but NVIDIA apex is not importable "
                               "(it ships in NVIDIA's PyTorch containers; use optim.impl=auto)") from None
        return FusedSGD(params, **kw)
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return torch.optim.SGD(params, **{impl: True}, **kw)


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of correct top-k predictions, as a device tensor (no sync)."""
    k = min(max(ks), logits.shape[1])
    pred = logits.topk(k, 1).indices
    hit = pred.eq(target[:, None])
    return torch.stack([hit[:, :min(kk, k)].any(1).sum() for kk in ks])


@torch.no_grad()
def evaluate(model, loader, device, autocast=None, dist=None) -> dict:
    """Top-1 / top-5 / CE loss over a validation loader, reduced across ranks."""
    autocast = autocast or nullcontext
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
    n = torch.zeros((), dtype=torch.long, device=device)
    for batch in loader:
        with autocast():
            logits = model(batch.image)
        logits = logits.float()
        tot[0] += F.cross_entropy(logits, batch.target, reduction="sum").double()
        tot[1:] += accuracy_counts(logits, batch.target).double()
        n += batch.target.numel()
    if dist is not None and dist.world > 1:
        torch.distributed.all_reduce(tot)
        torch.distributed.all_reduce(n)
    loss, top1, top5 = (tot / max(int(n.item()), 1)).tolist()
    return {"val_loss": loss, "val_top1": 100.0 * top1, "val_top5": 100.0 * top5}


class Trainer:
    def __init__(self, cfg, device: torch.device, run_dir: str, train_loader, val_loader, dist=None,
                 train_source=None):
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        self.train_loader, self.val_loader = train_loader, val_loader
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.method = cfg.method
        nc = cfg.data.num_classes
        mf = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        self.student = create_model(cfg.model.name, nc).to(device, memory_format=mf)
        if cfg.model.ckpt:
            load_model_weights(self.student, cfg.model.ckpt, cfg.model.name, "model.ckpt")
        self.teacher = self.cache = None
        if self.method.name != "ce" and cfg.teacher.source == "cache":
            self.cache = open_cache(cfg, train_source, device)
        elif self.method.name != "ce":
            if not cfg.teacher.ckpt:
                raise CheckpointError(f"teacher.ckpt is required for method '{self.method.name}'")
            self.teacher = frozen_teacher(cfg, device)
        self.model = self.student
        if dist is not None and dist.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)
        # Compiled callables for the training step only; checkpoints and validation use the
        # plain modules. DDP is compiled from outside, so its bucketed all-reduce stays (DDPOptimizer).
        self.student_fwd, self.teacher_fwd = self.model, self.teacher
        if cfg.run.compile:
            self.student_fwd = torch.compile(self.model)
            if self.teacher is not None:
                self.teacher_fwd = torch.compile(self.teacher)
        self.opt = build_optimizer(self.student.parameters(), cfg.optim, device)
        self.autocast, self.amp_dtype, use_scaler = autocast_for(cfg.run.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise UserError("the training set is smaller than one batch (lower pipeline.batch_size)")
        self.base_lr = base_lr(cfg.optim, cfg.pipeline.batch_size)
        self.world = dist.world if dist is not None else 1
        self.epoch, self.step, self.best_top1 = 0, 0, -1.0
        self.history = []

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "best_top1": self.best_top1, "lr": self.opt.param_groups[0]["lr"],
                "model_name": self.cfg.model.name, "config": OmegaConf.to_yaml(self.cfg),
                "rng": rng_state(), "history": json.dumps(self.history)}

    def save(self, name: str):
        if self.is_main:
            atomic_save(self.state(), os.path.join(self.run_dir, name))

    def resume(self, path: str):
        ck = safe_load(path, map_location=self.device)
        for key in ("model", "optimizer", "epoch", "step"):
            if key not in ck:
                raise CheckpointError(f"{path}: not a training checkpoint (no '{key}'); "
                                      f"use model.ckpt to start from weights")
        self.student.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step, self.best_top1 = ck["epoch"], ck["step"], ck["best_top1"]
        self.history = json.loads(ck.get("history", "[]"))
        set_rng_state(ck["rng"])

    # ---- one step ----------------------------------------------------------------------------
    def teacher_logits(self, batch, two_views: bool = True):
        """The online teacher's float32 logits (weak, strong or None): one forward over both views."""
        with torch.inference_mode(), self.autocast():
            t = self.teacher_fwd(torch.cat([batch.weak, batch.strong]) if two_views else batch.weak)
        t = t.float().clone()  # the clone leaves inference mode, so the loss may save it for backward
        return t.chunk(2) if two_views else (t, None)

    def forward_losses(self, batch, teacher=None):
        """(loss components and CRLD gate pass rates as device tensors, the student's weak-view logits).
        `teacher` is the batch's cached (weak, strong) logits; without it the online teacher runs, if any."""
        w, s, y = batch.weak, batch.strong, batch.target
        two_views = self.method.name == "crld"
        if teacher is None and self.teacher is not None:
            teacher = self.teacher_logits(batch, two_views)
        t_w, t_s = teacher if teacher is not None else (None, None)
        with self.autocast():
            if not two_views:
                s_w, s_s = self.student_fwd(w), None
            elif self.method.joint_forward:
                s_w, s_s = self.student_fwd(torch.cat([w, s])).chunk(2)
            else:
                s_w, s_s = self.student_fwd(w), self.student_fwd(s)
        return method_loss(self.method, s_w, s_s, t_w, t_s, y, epoch=self.epoch + 1), s_w

    def train_step(self, batch, teacher=None):
        """One optimisation step at the current `self.step`: (loss components as device tensors, the
        student's weak-view logits, the LR used)."""
        lr = lr_at(self.step, self.steps_per_epoch, self.cfg.optim, self.base_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        losses, s_w = self.forward_losses(batch, teacher)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        return losses, s_w, lr

    def epoch_batches(self, epoch: int):
        """(batch, its cached teacher logits or None) of training epoch `epoch`. With a cycled cache, epoch e
        replays augmentation epoch e % E: the loader's views (and order) and the cache's rows both come from it."""
        view_epoch = self.cache.view_epoch(epoch) if self.cache is not None else epoch
        self.train_loader.set_epoch(view_epoch)
        if self.cache is None:
            return ((b, None) for b in self.train_loader)
        return self.cache.alongside(self.train_loader, view_epoch)

    def train_epoch(self):
        self.model.train()
        names, sums, acc, n_seen = None, None, None, 0
        unchecked = self.step  # the first step not yet checked for a non-finite loss
        bar = progress(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}",
                       disable=not (self.is_main and self.cfg.run.progress), leave=False, dynamic_ncols=True)
        t0, wait = time.perf_counter(), 0.0
        t_fetch = time.perf_counter()
        for i, (batch, teacher) in enumerate(self.epoch_batches(self.epoch)):
            wait += time.perf_counter() - t_fetch
            losses, s_w, lr = self.train_step(batch, teacher)
            with torch.no_grad():
                comps = torch.stack([v.detach().float() for v in losses.values()])
                if names is None:
                    names, sums = list(losses), torch.zeros_like(comps)
                    acc = torch.zeros(2, dtype=torch.long, device=self.device)
                bs = batch.target.numel()
                sums += comps * bs
                acc += accuracy_counts(s_w.detach(), batch.target)
            n_seen += bs
            if (i + 1) % self.cfg.run.log_every == 0 or i + 1 == self.steps_per_epoch:
                self._check_finite(sums, names, unchecked)
                unchecked = self.step
                avg = (sums / n_seen).tolist()
                bar.set_postfix(loss=f"{avg[0]:.3f}", acc=f"{100.0 * acc[0].item() / n_seen:.1f}",
                                sps=f"{n_seen / (time.perf_counter() - t0):.0f}", lr=f"{lr:.3g}")
            bar.update(1)
            t_fetch = time.perf_counter()
        bar.close()
        if self.world > 1:  # every rank's samples count in the logged means (rank 0 writes them)
            n_t = torch.tensor([float(n_seen)], dtype=torch.float64, device=self.device)
            packed = torch.cat([sums.double(), acc.double(), n_t])  # float64: counts stay exact
            torch.distributed.all_reduce(packed)
            sums, acc, n_seen = packed[:len(sums)], packed[len(sums):-1], int(packed[-1].item())
        elapsed = time.perf_counter() - t0
        stats = {f"train_{k}": v for k, v in zip(names, (sums / n_seen).tolist())}
        stats.update(train_top1=100.0 * acc[0].item() / n_seen, lr=lr, epoch_time_s=elapsed,
                     samples_per_s=n_seen / elapsed, data_wait_frac=wait / elapsed, world=self.world)
        return stats

    def _check_finite(self, sums, names, first: int):
        """Stops the run if a loss component was NaN or infinite in steps `first`..`self.step - 1`: such a
        value stays in the epoch's running sums, so reading them at the logging sync costs the step nothing.
        All ranks stop together, at the same check."""
        bad = (~torch.isfinite(sums)).int()
        if self.world > 1:
            torch.distributed.all_reduce(bad, torch.distributed.ReduceOp.MAX)
        comps = [n for n, b in zip(names, bad.tolist()) if b]
        if comps:
            last = self.step - 1
            where = f"at step {last}" if first == last else f"in steps {first}-{last}"
            hint = "" if first == last else "; run.log_every=1 names the first bad step"
            raise NonFiniteLoss(f"non-finite loss {where} (epoch {self.epoch + 1}) in component(s): "
                                f"{', '.join(comps)}; stopping (try a lower optim.lr or run.amp=off{hint})")

    def validate(self, model: Optional[torch.nn.Module] = None) -> dict:
        return evaluate(model or self.student, self.val_loader, self.device, self.autocast, self.dist)

    # ---- the run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        epochs = self.cfg.optim.epochs
        t_start = time.perf_counter()
        if self.teacher is not None:  # every rank: the validation set is sharded and reduced
            self.teacher_metrics = self.validate(self.teacher)
            if self.is_main:
                log.info("teacher %s: top-1 %.2f", self.cfg.teacher.name, self.teacher_metrics["val_top1"])
        elif self.cache is not None and "teacher_val_top1" in self.cache.meta:
            self.teacher_metrics = {"val_top1": self.cache.meta["teacher_val_top1"]}
        while self.epoch < epochs:
            stats = self.train_epoch()
            stats.update(self.validate())
            self.epoch += 1
            stats["epoch"] = self.epoch
            is_best = stats["val_top1"] > self.best_top1
            if is_best:
                self.best_top1 = stats["val_top1"]
            self.history.append(stats)
            if self.is_main:
                with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(stats) + "\n")
                tqdm.write(f"epoch {self.epoch}/{epochs}  loss {stats['train_loss']:.4f}  "
                           f"val top-1 {stats['val_top1']:.2f}  top-5 {stats['val_top5']:.2f}  "
                           f"{stats['samples_per_s']:.0f} samples/s")
            if is_best:
                self.save("best.pt")
            if self.epoch % self.cfg.run.save_every == 0 or self.epoch == epochs:
                self.save("last.pt")
        wall = time.perf_counter() - t_start
        last = self.history[-1]
        best_epoch = max(self.history, key=lambda h: h["val_top1"])
        summary = {"model": self.cfg.model.name, "method": self.method.name, "epochs": self.epoch,
                   "best_top1": self.best_top1, "best_epoch": best_epoch["epoch"],
                   "last_top1": last["val_top1"], "last_top5": last["val_top5"],
                   "wall_time_s": wall,
                   "samples_per_s": sum(h["samples_per_s"] for h in self.history) / len(self.history)}
        if getattr(self, "teacher_metrics", None):
            summary["teacher_top1"] = self.teacher_metrics["val_top1"]
        if self.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        return summary
