"""The training loop: one small readable `Trainer` for ce / kd / dkd / crld, for one student or a group.

Each batch is loaded once; the teacher is frozen, in eval mode, never wrapped, and runs once per step on
the views the students need (both concatenated under `torch.inference_mode()` when any student is crld), or
its logits are read once from the cache. Then each student (`training.student`) takes its own step; a crld
student runs the two views as two forwards (BN statistics per view, as the paper) unless
`method.joint_forward`. Views are a pure function of seed, epoch, index and view, so a student in a group
sees exactly the batches, views and teacher logits of its solo run. The hot loop has no host syncs except
every `run.log_every` steps, where progress and the non-finite check are read.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import RuntimeConfigError, UserError
from training.checkpoint import CheckpointError, load_model_weights
from training.hub_weights import local_weights
from training.losses import distillation_term, views_needed
from training.models import create_model
from training.preemption import Preempted, StopRequest
from training.progress import progress
from training.runtime import autocast_for
from training.student import Student, accuracy_counts
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


def open_cache(cfg, train_source, device, methods=()):
    """The checked teacher cache for this run (the teacher model is never built). Storage precision
    and k are the cache's own choice; everything that decides the views and the teacher is checked.
    `methods`: every student's method config (a top-k cache serves one temperature, without standardisation)."""
    fp = (read_meta(cfg.teacher.cache) or {}).get("fingerprint") or {}
    precision, topk = fp.get("precision"), fp.get("topk")
    for k, m in enumerate(methods or [cfg.method]):
        who = f" (student {k})" if k else ""
        if topk and m.logit_stand:
            raise RuntimeConfigError(f"{cfg.teacher.cache}: a top-{topk} cache cannot serve method.logit_stand=true"
                                     f"{who} (standardisation needs every logit); build a full cache")
        uses = distillation_term(m)
        if topk and uses in ("nkd", "normkd", "mlkd"):
            raise RuntimeConfigError(f"{cfg.teacher.cache}: a top-{topk} cache cannot serve {uses}"
                                     f"{who} (it reads the teacher at temperatures other than method.temperature, "
                                     f"or each row's spread); build a full cache")
        if topk and m.temperature != cfg.method.temperature:
            raise RuntimeConfigError(f"{cfg.teacher.cache}: a top-{topk} cache holds fill values for one "
                                     f"method.temperature; student {k} asks {m.temperature}, student 0 "
                                     f"{cfg.method.temperature}; build a full cache")
    wanted_sha = teacher_sha_if_present(cfg, cfg.teacher.cache)
    wanted = fingerprint(cfg, train_source, precision=precision, topk=topk, teacher_sha=wanted_sha, device=device)
    return TeacherCache(cfg.teacher.cache, wanted, cfg.optim.epochs, cfg.teacher.cache_cycle, device)


def teacher_sha_if_present(cfg, cache_dir):
    """The teacher checkpoint's hash when the file is on this machine; None (the cache's fingerprint is trusted
    for the teacher) when it is not: a cache built elsewhere travels without its teacher."""
    if not cfg.teacher.ckpt:
        return None
    path = local_weights(cfg.teacher.ckpt, cfg.teacher.name)
    if not os.path.isfile(path):
        log.info("teacher.ckpt %s is not on this machine: trusting the teacher named in %s's fingerprint",
                 cfg.teacher.ckpt, cache_dir)
        return None
    return file_sha256(path)


@torch.no_grad()
def evaluate(models, loader, device, autocast=None, dist=None) -> list:
    """Top-1 / top-5 / CE loss of each model over one pass of a validation loader, reduced across ranks."""
    autocast = autocast or nullcontext
    for m in models:
        m.eval()
    tot = torch.zeros(len(models), 3, dtype=torch.float64, device=device)  # loss sum, top-1, top-5 hits
    n = torch.zeros((), dtype=torch.long, device=device)
    for batch in loader:
        for k, m in enumerate(models):
            with autocast():
                logits = m(batch.image)
            logits = logits.float()
            tot[k, 0] += F.cross_entropy(logits, batch.target, reduction="sum").double()
            tot[k, 1:] += accuracy_counts(logits, batch.target).double()
        n += batch.target.numel()
    if dist is not None and dist.world > 1:
        torch.distributed.all_reduce(tot)
        torch.distributed.all_reduce(n)
    return [{"val_loss": loss, "val_top1": 100.0 * top1, "val_top5": 100.0 * top5}
            for loss, top1, top5 in (tot / max(int(n.item()), 1)).tolist()]


class Trainer:
    """The shared part of a run (loaders, teacher or cache, the epoch loop) and its students.
    `students`: (config, run directory) per student; default the one student of `cfg` in `run_dir`."""

    def __init__(self, cfg, device: torch.device, run_dir: str, train_loader, val_loader, dist=None,
                 train_source=None, students=None):
        self.cfg, self.device = cfg, device
        self.train_loader, self.val_loader = train_loader, val_loader
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.world = dist.world if dist is not None else 1
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise UserError("the training set is smaller than one batch (lower pipeline.batch_size)")
        self.autocast, self.amp_dtype, use_scaler = autocast_for(cfg.run.amp, device)
        students = students or [(cfg, run_dir)]
        self.students = [Student(c, device, d, self.steps_per_epoch, self.autocast, use_scaler, dist)
                         for c, d in students]
        methods = [c.method for c, _ in students]
        self.teacher = self.teacher_fwd = self.cache = None
        if any(m.name != "ce" for m in methods):
            if cfg.teacher.source == "cache":
                self.cache = open_cache(cfg, train_source, device, methods)
            else:
                if not cfg.teacher.ckpt:
                    raise CheckpointError(f"teacher.ckpt is required for method "
                                          f"'{next(m.name for m in methods if m.name != 'ce')}'")
                self.teacher = frozen_teacher(cfg, device)
                self.teacher_fwd = torch.compile(self.teacher) if cfg.run.compile else self.teacher
        self.teacher_metrics = None
        self.stop = StopRequest()  # train.py installs its signal handlers; without them no signal is seen
        self.last_save, self.stopping = time.monotonic(), False

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    # ---- one step ----------------------------------------------------------------------------
    def teacher_logits(self, batch, two_views: bool = True):
        """The online teacher's float32 logits (weak, strong or None): one forward over the views."""
        with torch.inference_mode(), self.autocast():
            t = self.teacher_fwd(torch.cat([batch.weak, batch.strong]) if two_views else batch.weak)
        t = t.float().clone()  # the clone leaves inference mode, so the loss may save it for backward
        return t.chunk(2) if two_views else (t, None)

    def train_step(self, batch, cached=None, students=None):
        """One step of each student (default all) on `batch`: the teacher's logits (`cached`, or the online
        teacher's on the views any of them needs) computed once. Returns each student's train_step result."""
        students = self.students if students is None else students
        teacher = cached
        if teacher is None and self.teacher is not None and any(st.method.name != "ce" for st in students):
            teacher = self.teacher_logits(batch, max(views_needed(st.method.name) for st in students) == 2)
        return [st.train_step(batch, teacher if st.method.name != "ce" else None) for st in students]

    def epoch_batches(self, epoch: int, start: int = 0):
        """(batch, its cached teacher logits or None) of training epoch `epoch`, from its batch `start` on. With a
        cycled cache, epoch e replays augmentation epoch e % E: the loader's views (and order) and the cache's
        rows both come from it."""
        view_epoch = self.cache.view_epoch(epoch) if self.cache is not None else epoch
        self.train_loader.set_epoch(view_epoch, start)
        if self.cache is None:
            return ((b, None) for b in self.train_loader)
        return self.cache.alongside(self.train_loader, view_epoch)

    def train_epoch(self, epoch: int, students) -> dict:
        """Epoch `epoch` for `students` (all in that epoch), from the first step any of them still needs: a
        student resumed mid-epoch, or ahead of the others, sits out the batches it already has. Their running
        sums are in each Student. Returns the epoch's shared figures (time, samples/s, data wait)."""
        first = epoch * self.steps_per_epoch
        for st in students:
            st.model.train()
            if st.step == first:
                st.begin_epoch()
        start = min(st.position() for st in students)
        bar = progress(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}",
                       disable=not (self.is_main and self.cfg.run.progress), leave=False, dynamic_ncols=True)
        t0, wait, n_seen = time.perf_counter(), 0.0, 0
        t_fetch = time.perf_counter()
        for i, (batch, cached) in enumerate(self.epoch_batches(epoch, start), start=start):
            wait += time.perf_counter() - t_fetch
            self.train_step(batch, cached, [st for st in students if st.failed is None and st.step == first + i])
            n_seen += batch.target.numel()
            stop_now = self.stop.signal is not None and self.world == 1  # one process: no need to agree
            if stop_now or (i + 1) % self.cfg.run.log_every == 0 or i + 1 == self.steps_per_epoch:
                stop = self._check_finite([st for st in students if st.failed is None and st.unchecked < st.step])
                students = [st for st in students if st.failed is None]
                if not students:
                    break
                if i + 1 == self.steps_per_epoch:
                    self.stopping = stop  # the epoch ends anyway: its checkpoint, then the stop (fit)
                elif stop or self._save_due():
                    self._save_mid_epoch(students)
                    if stop:
                        raise Preempted(f"stopped by {self.stop.signal or 'a signal on another rank'} after step "
                                        f"{i + 1} of epoch {epoch + 1}; last.pt written, --resume continues there")
                lead = students[0]
                avg = (lead.sums / lead.n_seen).tolist()
                bar.set_postfix(loss=f"{avg[0]:.3f}", acc=f"{100.0 * lead.acc[0].item() / lead.n_seen:.1f}",
                                sps=f"{n_seen / (time.perf_counter() - t0):.0f}", lr=f"{lead.lr:.3g}")
            bar.update(1)
            t_fetch = time.perf_counter()
        bar.close()
        elapsed = time.perf_counter() - t0
        return {"epoch_time_s": elapsed, "samples_per_s": n_seen * self.world / elapsed,
                "data_wait_frac": wait / elapsed, "world": self.world}

    def _epoch_stats(self, st) -> dict:
        """A student's epoch means; under DDP every rank's samples count (rank 0 writes them)."""
        sums, acc, n_seen = st.sums, st.acc, st.n_seen
        if self.world > 1:
            n_t = torch.tensor([float(n_seen)], dtype=torch.float64, device=self.device)
            packed = torch.cat([sums.double(), acc.double(), n_t])  # float64: counts stay exact
            torch.distributed.all_reduce(packed)
            sums, acc, n_seen = packed[:len(sums)], packed[len(sums):-1], int(packed[-1].item())
        stats = {f"train_{k}": v for k, v in zip(st.names, (sums / n_seen).tolist())}
        stats.update(train_top1=100.0 * acc[0].item() / n_seen, lr=st.lr)
        return stats

    def _save_due(self) -> bool:
        """Whether run.save_every_min has passed since the last checkpoint (rank 0 writes; no agreement needed)."""
        every = self.cfg.run.save_every_min
        return every > 0 and time.monotonic() - self.last_save > 60 * every

    def _save_mid_epoch(self, students) -> None:
        for st in students:
            st.save("last.pt")
        self.last_save = time.monotonic()

    def _check_finite(self, students) -> bool:
        """Stops a student whose loss component was NaN or infinite since its last check: such a value stays in
        the epoch's running sums, so reading them at the logging sync costs the step nothing. One reduction for
        all students and the stop signal, so every rank stops the same students, and the run, at the same step.
        A solo run raises. Returns whether any rank was asked to stop."""
        asked = torch.tensor([int(self.stop.signal is not None)], device=self.device)
        bad = torch.cat([(~torch.isfinite(st.sums)).int() for st in students] + [asked.int()])
        if self.world > 1:
            torch.distributed.all_reduce(bad, torch.distributed.ReduceOp.MAX)
        bad, stop = bad[:-1], bool(bad[-1].item())
        for st, row in zip(students, bad.split([len(st.names) for st in students])):
            comps = [n for n, b in zip(st.names, row.tolist()) if b]
            first, last = st.unchecked, st.step - 1
            st.unchecked = st.step
            if comps:
                where = f"at step {last}" if first == last else f"in steps {first}-{last}"
                hint = "" if first == last else "; run.log_every=1 names the first bad step"
                st.failed = (f"non-finite loss {where} (epoch {st.epoch + 1}) in component(s): {', '.join(comps)}; "
                             f"stopping (try a lower optim.lr or run.amp=off{hint})")
                if len(self.students) == 1:
                    raise NonFiniteLoss(st.failed)
                log.warning("%s: %s", st.run_dir, st.failed)
                st.summary(0.0, self._teacher_top1())
        return stop

    def validate(self, models=None) -> list:
        models = models if models is not None else [st.student for st in self.students]
        return evaluate(models, self.val_loader, self.device, self.autocast, self.dist)

    def _teacher_top1(self):
        return self.teacher_metrics["val_top1"] if self.teacher_metrics else None

    # ---- the run -----------------------------------------------------------------------------
    def fit(self) -> list:
        """Train every student to optim.epochs; a student ahead (a group killed between two students'
        checkpoints) sits out the epochs it already has. Returns each student's summary."""
        epochs = self.cfg.optim.epochs
        t_start = time.perf_counter()
        if self.teacher is not None:  # every rank: the validation set is sharded and reduced
            self.teacher_metrics = self.validate([self.teacher])[0]
            if self.is_main:
                log.info("teacher %s: top-1 %.2f", self.cfg.teacher.name, self.teacher_metrics["val_top1"])
        elif self.cache is not None and "teacher_val_top1" in self.cache.meta:
            self.teacher_metrics = {"val_top1": self.cache.meta["teacher_val_top1"]}
        while True:
            live = [st for st in self.students if st.failed is None and st.epoch < epochs]
            if not live:
                break
            epoch = min(st.epoch for st in live)
            active = [st for st in live if st.epoch == epoch]
            shared = self.train_epoch(epoch, active)
            active = [st for st in active if st.failed is None]
            if not active:
                continue
            stats = [self._epoch_stats(st) for st in active]
            for st, s, v in zip(active, stats, self.validate([st.student for st in active])):
                s.update(shared, **v)
                st.end_epoch(s, epochs, force_save=self.stopping)
            if self.is_main:
                parts = [f"{self._tag(st)}loss {s['train_loss']:.4f}  val top-1 {s['val_top1']:.2f}  "
                         f"top-5 {s['val_top5']:.2f}" for st, s in zip(active, stats)]
                tqdm.write(f"epoch {epoch + 1}/{epochs}  " + "  ".join(parts)
                           + f"  {shared['samples_per_s']:.0f} samples/s")
            if self.stopping and any(st.epoch < epochs for st in self.students if st.failed is None):
                raise Preempted(f"stopped by {self.stop.signal or 'a signal on another rank'} at the end of epoch "
                                f"{epoch + 1}; last.pt written, --resume continues there")
        wall = time.perf_counter() - t_start
        return [st.summary(wall, self._teacher_top1()) for st in self.students]

    def _tag(self, st) -> str:
        return f"[{self.students.index(st)}] " if len(self.students) > 1 else ""
