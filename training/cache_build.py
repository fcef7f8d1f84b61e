"""Building a teacher cache on every rank of every node (`cache_teacher.py`, alone or under torchrun).

Rank 0 holds the directory's lock, prepares it (a killed build's temp files go; its complete units and epochs
stay when its fingerprint is this build's), plans the missing units, sizes them against the free space and
tells every rank; the ranks then build the units round-robin, a round at a time. After each round they agree
on whether a stop signal arrived (then all exit 75, as train.py does) and the epochs whose units are all present
are assembled, epoch e by rank e % world. Rank 0 writes meta.json once every epoch is there.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import time

import torch

from common.errors import UserError
from common.files import human, output_error, writing
from training.cache_units import (UNITS, assemble_epoch, block_size, epoch_disk_bytes, plan_units, present_units,
                                  stale_entries, unit_writer)
from training.preemption import MARKER, Preempted
from training.progress import progress
from training.teacher_cache import CacheError, compare_fingerprints, epoch_dir, read_meta, write_meta

log = logging.getLogger("cache_teacher")
BUILD_STATE = ".build.json"  # the running build's fingerprint: its units and epochs are trusted on a rerun
MARGIN = 64 << 20


def agree(dist, fn):
    """fn() on rank 0; its result on every rank, or its UserError raised on every rank (one line each)."""
    if dist.world <= 1:
        return fn()
    box = [None]
    if dist.is_main:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", type(e), str(e))
    torch.distributed.broadcast_object_list(box, 0)
    if box[0][0] == "error":
        raise box[0][1](box[0][2])
    return box[0][1]


def gather(dist, device, values) -> list:
    """Each rank's `values` (floats), as a list per rank."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.world <= 1:
        return [t.tolist()]
    every = [torch.empty_like(t) for _ in range(dist.world)]
    torch.distributed.all_gather(every, t)
    return [x.tolist() for x in every]


def _is_cache_entry(name: str) -> bool:
    return name in ("meta.json", MARKER) or name.startswith(".") or re.fullmatch(r"epoch_\d{4}", name) is not None


def _create_lock(lock: str) -> int:
    """The lock file, created exclusively; FileExistsError (another builder) passes, other faults of the
    output folder are one-line `OutputError`s."""
    try:
        return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise
    except OSError as e:
        with writing(lock):
            raise e


@contextlib.contextmanager
def build_lock(out: str):
    """One builder per cache directory (rank 0 of a torchrun build holds it for every rank): a second one, or
    a stale lock of a live process, is refused."""
    lock = os.path.join(out, ".lock")
    for _ in range(2):
        try:
            fd = _create_lock(lock)
            break
        except FileExistsError:
            try:
                pid = int(open(lock).read().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, OSError):
                os.remove(lock)  # left by a killed build
                continue
            raise CacheError(f"{out}: another cache_teacher.py (pid {pid}) is building this cache") from None
    else:
        raise CacheError(f"{out}: cannot take the build lock {lock}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        if os.path.exists(lock):
            os.remove(lock)


def _read_state(out: str):
    try:
        with open(os.path.join(out, BUILD_STATE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def prepare(out: str, fp: dict, overwrite: bool, n: int, c: int) -> dict:
    """Rank 0, under the lock: the cache's meta (a fresh one for a new cache), the directory cleared of what
    cannot be reused and marked with this build's fingerprint."""
    meta = read_meta(out)
    resumable = meta is None and not overwrite and (_read_state(out) or {}).get("fingerprint") == fp
    if (meta is None and not resumable) or overwrite:
        odd = [x for x in os.listdir(out) if not _is_cache_entry(x)]
        if odd:
            raise CacheError(f"{out}: exists and is not a teacher cache (holds {odd[0]}); choose another --out")
        for name in os.listdir(out):  # a replaced cache, or a build of another fingerprint killed before meta.json
            if name != ".lock":
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        meta = None
    if meta is not None:
        compare_fingerprints(out, meta.get("fingerprint"), fp)
    for path in stale_entries(out):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    write_meta(out, {"fingerprint": fp}, name=BUILD_STATE)
    return meta or {"fingerprint": fp, "epochs": 0, "num_samples": n, "num_classes": c, "builds": []}


def plan(out: str, meta: dict, epochs: int, batch_size: int, world: int, unit_batches: int, precision: str,
         topk: int) -> dict:
    """Rank 0: the units left to build, sized against the target's free space before any teacher forward."""
    n, c = meta["num_samples"], meta["num_classes"]
    missing = [e for e in range(epochs) if not os.path.isdir(epoch_dir(out, e))]
    units = plan_units(n, batch_size, missing, world, unit_batches)
    present = present_units(out)
    for name in present - {u.name for u in units}:  # another layout's units, or units of complete epochs
        shutil.rmtree(os.path.join(out, UNITS, name), ignore_errors=True)
    todo = [u for u in units if u.name not in present]
    per_epoch = epoch_disk_bytes(n, c, precision, topk, block_size(out))
    per_unit_epoch = max(1, len(units) // max(1, len(missing)))
    staging = min(len(missing), -(-world // per_unit_epoch)) * per_epoch  # units of epochs not yet assembled
    free = shutil.disk_usage(out).free
    what = f"top-{topk}" if topk else f"all {c} logits"
    print(f"{out}: {human(per_epoch)} on disk per epoch ({n} samples x 2 views, {what}, {precision}), "
          f"{human(per_epoch * epochs)} for {epochs} epochs; to build: {len(missing)} epochs in {len(todo)} units "
          f"({len(units) - len(todo)} present), {human(per_epoch * len(missing))} + up to {human(staging)} of "
          f"units in flight; {human(free)} free on its file system", flush=True)
    need = per_epoch * len(missing) + staging + (MARGIN if missing else 0)
    if free < need:
        raise CacheError(f"{out}: not enough disk space: the cache needs {human(need)} more ({len(missing)} epochs "
                         f"x {human(per_epoch)} + {human(staging)} in flight + {human(MARGIN)} margin), its file "
                         f"system has {human(free)} free; {epochs - len(missing)} complete epochs kept")
    return {"units": units, "todo": todo, "missing": missing, "epoch_bytes": epoch_disk_bytes(n, c, precision, topk)}


class UnitBuilder:
    """This rank's share of the plan: its units built, the epochs it assembles, the agreement after each round."""

    def __init__(self, out, dist, device, loader, forward, args, cfg, stop):
        self.out, self.dist, self.device, self.loader, self.forward = out, dist, device, loader, forward
        self.args, self.cfg, self.stop = args, cfg, stop
        self.samples, self.seconds = 0, 0.0

    def build_unit(self, u, c):
        a, cfg = self.args, self.cfg
        writer = unit_writer(self.out, u, c, a.precision, a.topk, cfg.method.temperature, cfg.run.seed)
        t0 = time.perf_counter()
        try:
            self.loader.set_epoch(u.epoch, start=u.first_batch)
            for b in itertools.islice(self.loader, u.end_batch - u.first_batch):
                writer.write(b.index_host.numpy() if b.index_host is not None else b.index.cpu().numpy(),
                             self.forward(b))
            writer.commit()
        except OSError as err:
            writer.abort()
            raise CacheError(f"{output_error(err, u.path(self.out))}; temp files removed, complete epochs and "
                             f"units kept") from None
        except BaseException:
            writer.abort()
            raise
        self.samples += u.rows[1] - u.rows[0]
        self.seconds += time.perf_counter() - t0

    def run(self, work: dict, c: int) -> list:
        """Builds this rank's units and assembles its epochs; every rank's samples/s."""
        todo, units, dist = work["todo"], work["units"], self.dist
        last = {e: max([i for i, u in enumerate(todo) if u.epoch == e], default=-1) for e in work["missing"]}
        assembled = set()
        bar = progress(total=len(todo), desc="cache units", unit="unit",
                       disable=not (self.cfg.run.progress and dist.is_main))
        rounds = -(-len(todo) // dist.world)
        rates = [0.0] * dist.world
        try:
            for r in range(-1, rounds):  # round -1 assembles the epochs a killed build left complete in units
                k = r * dist.world + dist.rank
                if r >= 0 and k < len(todo):
                    self.build_unit(todo[k], c)
                flags = gather(dist, self.device, [self.stop.signal is not None, self.samples, self.seconds])
                rates = [s / t if t else 0.0 for _, s, t in flags]
                done = min(len(todo), (r + 1) * dist.world)
                if r >= 0:
                    bar.update(done - bar.n)
                    bar.set_postfix_str(f"{sum(rates):.0f} samples/s, per rank "
                                        f"{' '.join(f'{x:.0f}' for x in rates)}", refresh=False)
                if any(f[0] for f in flags):
                    by = self.stop.signal or "a signal on another rank"
                    raise Preempted(f"stopped by {by} after {done} of {len(todo)} units (complete units are kept; "
                                    f"the same command builds the rest)")
                for e in sorted(set(last) - assembled):
                    if last[e] < done:
                        assembled.add(e)
                        if e % dist.world == dist.rank:
                            assemble_epoch(self.out, e, [u for u in units if u.epoch == e], c, self.args.precision,
                                           self.args.topk, self.cfg.run.seed)
        finally:
            bar.close()
        gather(dist, self.device, [0.0])  # every rank's assembly is done
        return rates
