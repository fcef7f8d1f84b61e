"""One student of a run: its model, optimiser, LR schedule, grad scaler, random stream, counters and files.

A run trains one student or a group of them from the same batches and teacher logits (`training.loop`).
Everything that makes a student's trajectory its own lives here, so a student in a group follows exactly the
steps it would take alone: its weights are initialised from `model.init_seed` (+ rank) in a random stream of
its own, and every step runs inside that stream (dropout, if any), never in the shared one the loaders draw
from. Its directory holds what a solo run's does: config.yaml, run_info.json, metrics.jsonl, best.pt,
last.pt, summary.json.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager

import torch
from omegaconf import OmegaConf

from common import flat_items
from common.errors import RuntimeConfigError, UserError
from common.files import save_json_atomic, writing
from training.checkpoint import CheckpointError, atomic_save, load_model_weights, safe_load
from training.losses import method_loss, views_needed
from training.models import create_model
from training.schedule import base_lr, lr_at


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


def _stream_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_stream_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# What may differ between a run and the run it resumes: the length of training (extending a run), logging and
# checkpoint cadence, where files go, and how many workers and threads prepare the same batches.
RESUME_MAY_CHANGE = ("optim.epochs", "run.progress", "run.log_every", "run.save_every", "run.save_every_min",
                     "run.dist_timeout_s", "run.out_dir", "run.name", "run.device", "run.compile",
                     "run.deterministic", "run.tensorboard", "pipeline.num_workers", "pipeline.host_threads",
                     "pipeline.dali_threads", "pipeline.dali_prefetch", "pipeline.val_batch_size", "data.root",
                     "teacher.cache", "run.cpus")


def check_resume(lasts: list, cfgs: list) -> None:
    """`--resume`, before anything is built or written: refuses, naming the file, a run without a checkpoint
    (`lasts`: each student's last.pt), a file that is not a training checkpoint and, naming the keys, one whose
    config trains something else (another model, method, data subset...) than its student's: only
    RESUME_MAY_CHANGE may differ, and keys the checkpoint predates are not compared. A group's student without a
    checkpoint (killed before its first) restarts."""
    if not any(os.path.isfile(p) for p in lasts):
        raise UserError(f"--resume: no checkpoint at {lasts[0]}"
                        + (" or in the other students' folders" if len(lasts) > 1 else ""))
    for path, cfg in ((p, c) for p, c in zip(lasts, cfgs) if os.path.isfile(p)):
        ck = safe_load(path, mmap=True)
        for key in ("model", "optimizer", "epoch", "step"):
            if key not in ck:
                raise CheckpointError(f"{path}: not a training checkpoint (no '{key}'); "
                                      f"use model.ckpt to start from weights")
        if not ck.get("config"):
            continue
        saved = dict(flat_items(OmegaConf.to_container(OmegaConf.create(ck["config"]))))
        now = dict(flat_items(OmegaConf.to_container(cfg)))
        diff = [k for k in now if k in saved and saved[k] != now[k] and k not in RESUME_MAY_CHANGE]
        if diff:
            shown = ", ".join(f"{k} ({saved[k]!r} -> {now[k]!r})" for k in diff[:4])
            shown += " ..." if len(diff) > 4 else ""
            raise CheckpointError(f"{path}: --resume under another config: {shown}; only optim.epochs, run.* "
                                  f"logging keys, paths and worker counts may change (start a new run.name instead)")


def resume_students(students: list, lasts: list) -> None:
    """Every student of a `--resume` (checked by `check_resume`) continues from its last.pt; one that stopped in
    an earlier attempt (its summary.json says why) stays stopped."""
    for st, last in zip(students, lasts):
        summary = os.path.join(st.run_dir, "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                st.failed = json.load(f).get("failed")
        if st.failed is None and os.path.isfile(last):
            st.resume(last)
            logging.info("resumed %s at epoch %d", last, st.epoch)


class Student:
    def __init__(self, cfg, device: torch.device, run_dir: str, steps_per_epoch: int, autocast, use_scaler: bool,
                 dist=None):
        self.cfg, self.device, self.run_dir, self.dist = cfg, device, run_dir, dist
        self.method = cfg.method
        self.is_main = dist is None or dist.is_main
        rank = dist.rank if dist is not None else 0
        mf = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.model.init_seed + rank)  # DDP then broadcasts rank 0's weights
            self.student = create_model(cfg.model.name, cfg.data.num_classes).to(device, memory_format=mf)
            self.rng = _stream_state(device)
        if cfg.model.ckpt:
            load_model_weights(self.student, cfg.model.ckpt, cfg.model.name, "model.ckpt")
        self.model = self.student
        if dist is not None and dist.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)
        # compiled for the training step only; checkpoints and validation use the plain module. DDP is
        # compiled from outside, so its bucketed all-reduce stays (DDPOptimizer).
        self.student_fwd = torch.compile(self.model) if cfg.run.compile else self.model
        self.opt = build_optimizer(self.student.parameters(), cfg.optim, device)
        self.autocast = autocast
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.steps_per_epoch = steps_per_epoch
        self.base_lr = base_lr(cfg.optim, cfg.pipeline.batch_size)
        self.epoch, self.step, self.best_top1 = 0, 0, -1.0
        self.history, self.failed = [], None  # failed: why the student stopped (a non-finite loss)
        self.writer = None  # TensorBoard, opened at the first epoch's end when run.tensorboard
        self.begin_epoch()

    @contextmanager
    def own_rng(self):
        """Run inside this student's random stream; the shared stream is left as it was."""
        outer = _stream_state(self.device)
        _set_stream_state(self.rng, self.device)
        try:
            yield
        finally:
            self.rng = _stream_state(self.device)
            _set_stream_state(outer, self.device)

    # ---- one step ----------------------------------------------------------------------------
    def forward_losses(self, batch, teacher=None):
        """(loss components and CRLD gate pass rates as device tensors, the student's weak-view logits);
        `teacher` is the batch's (weak, strong) teacher logits, None for ce."""
        w, s, y = batch.weak, batch.strong, batch.target
        t_w, t_s = teacher if teacher is not None else (None, None)
        with self.autocast():
            if views_needed(self.method.name) == 1:
                s_w, s_s = self.student_fwd(w), None
            elif self.method.joint_forward:
                s_w, s_s = self.student_fwd(torch.cat([w, s])).chunk(2)
            else:
                s_w, s_s = self.student_fwd(w), self.student_fwd(s)
        return method_loss(self.method, s_w, s_s, t_w, t_s, y, epoch=self.epoch + 1), s_w

    def train_step(self, batch, teacher=None):
        """One optimisation step at `self.step`, its loss components added to the epoch's running sums:
        (loss components as device tensors, the student's weak-view logits, the LR used)."""
        lr = lr_at(self.step, self.steps_per_epoch, self.cfg.optim, self.base_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with self.own_rng():
            losses, s_w = self.forward_losses(batch, teacher)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(losses["loss"]).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        self.step += 1
        self.lr = lr
        with torch.no_grad():
            comps = torch.stack([v.detach().float() for v in losses.values()])
            if self.names is None:
                self.names, self.sums = list(losses), torch.zeros_like(comps)
                self.acc = torch.zeros(2, dtype=torch.long, device=self.device)
            bs = batch.target.numel()
            self.sums += comps * bs
            self.acc += accuracy_counts(s_w.detach(), batch.target)
        self.n_seen += bs
        return losses, s_w, lr

    def begin_epoch(self):
        """Zero the epoch's running sums (device tensors, read only at the logging syncs)."""
        self.names, self.sums, self.acc, self.n_seen = None, None, None, 0
        self.unchecked = self.step  # the first step not yet checked for a non-finite loss

    def position(self) -> int:
        """Steps done in the current epoch (0 at an epoch boundary)."""
        return self.step - self.epoch * self.steps_per_epoch

    # ---- files -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "best_top1": self.best_top1, "lr": self.opt.param_groups[0]["lr"],
                "model_name": self.cfg.model.name, "config": OmegaConf.to_yaml(self.cfg),
                "rng": self.rng, "history": json.dumps(self.history),
                # mid-epoch: the epoch's running sums, so that its logged means come out as uninterrupted
                "epoch_sums": {"names": json.dumps(self.names), "sums": self.sums, "acc": self.acc,
                               "n_seen": self.n_seen, "unchecked": self.unchecked}}

    def save(self, name: str):
        if self.is_main:
            atomic_save(self.state(), os.path.join(self.run_dir, name))

    def resume(self, path: str):
        # read onto the CPU: the RNG states must stay CPU byte tensors (set_rng_state refuses device tensors);
        # load_state_dict puts weights and optimizer state on their parameters' device
        ck = safe_load(path, map_location="cpu")
        self.student.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step, self.best_top1 = ck["epoch"], ck["step"], ck["best_top1"]
        self.history = json.loads(ck.get("history", "[]"))
        self.rng = {k: ck["rng"][k] for k in ("torch", "cuda") if k in ck["rng"]}
        if self.device.type == "cuda" and isinstance(self.rng.get("cuda"), list):  # one state per device
            self.rng["cuda"] = self.rng["cuda"][self.device.index or 0]
        self.begin_epoch()
        sums = ck.get("epoch_sums")
        if self.position() and sums and sums["sums"] is not None:
            self.names, self.n_seen, self.unchecked = json.loads(sums["names"]), sums["n_seen"], sums["unchecked"]
            self.sums, self.acc = sums["sums"].to(self.device), sums["acc"].to(self.device)

    def end_epoch(self, stats: dict, epochs: int, force_save: bool = False) -> None:
        """Record a finished epoch: history, metrics.jsonl, best.pt / last.pt."""
        self.epoch += 1
        stats["epoch"] = self.epoch
        is_best = stats["val_top1"] > self.best_top1
        if is_best:
            self.best_top1 = stats["val_top1"]
        self.history.append(stats)
        if self.is_main:
            line, path = json.dumps(stats) + "\n", os.path.join(self.run_dir, "metrics.jsonl")
            with writing(path, len(line)), open(path, "a") as f:
                f.write(line)
            if self.cfg.run.tensorboard:
                self._tensorboard(stats)
        if is_best:
            self.save("best.pt")
        if self.epoch % self.cfg.run.save_every == 0 or self.epoch == epochs or force_save:
            self.save("last.pt")

    def _tensorboard(self, stats: dict) -> None:
        """The epoch's metrics.jsonl scalars as TensorBoard events: train/*, val/*, and the rest under run/."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # the tensorboard package, only when asked for
            self.writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        for key, v in stats.items():
            if isinstance(v, (int, float)) and key != "epoch":
                section, _, name = key.partition("_") if key.startswith(("train_", "val_")) else ("run", "", key)
                self.writer.add_scalar(f"{section}/{name}", v, self.epoch)
        self.writer.flush()

    def summary(self, wall_s: float, teacher_top1=None) -> dict:
        out = {"model": self.cfg.model.name, "method": self.method.name, "epochs": self.epoch,
               "best_top1": self.best_top1, "wall_time_s": wall_s}
        if self.history:
            last = self.history[-1]
            out.update(best_epoch=max(self.history, key=lambda h: h["val_top1"])["epoch"],
                       last_top1=last["val_top1"], last_top5=last["val_top5"],
                       samples_per_s=sum(h["samples_per_s"] for h in self.history) / len(self.history))
        if teacher_top1 is not None:
            out["teacher_top1"] = teacher_top1
        if self.failed:
            out["failed"] = self.failed
        if self.is_main:
            save_json_atomic(os.path.join(self.run_dir, "summary.json"), out)
        return out
