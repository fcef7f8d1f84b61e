"""A teacher cache's build units, their assembly into epochs, the checksums, the size estimate and `verify`.

A unit is a block of whole batches of one epoch (the whole epoch, or fewer batches so that a short cache still
spreads over every rank). Every builder walks the epoch in the full training order with the one-process batch
size, so a unit's rows are a contiguous range of the epoch's rows and hold the bytes a one-process build writes
there. Units are written to `.units/` (temp + rename); once all of an epoch's units are present, one rank
concatenates them into `epoch_NNNN/` (temp + rename) with `checksums.json` (bytes and CRC-32 of each file).
docs/cache_format.md describes the layout for other tools.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import zlib
from dataclasses import dataclass

import numpy as np

from common.files import fsync_path, writing
from pipelines.sampler import epoch_order
from training.teacher_cache import FORMAT, CacheError, RowWriter, array_specs, check_epoch_files, epoch_dir, read_meta

UNITS = ".units"
CHECKSUMS = "checksums.json"
UNITS_PER_RANK = 4  # enough units per rank that the last round leaves few ranks idle
_COPY_ROWS_BYTES = 64 << 20


@dataclass(frozen=True)
class Unit:
    epoch: int
    first_batch: int
    end_batch: int
    batch_size: int
    n: int

    @property
    def rows(self) -> tuple:
        return self.first_batch * self.batch_size, min(self.end_batch * self.batch_size, self.n)

    @property
    def name(self) -> str:
        lo, hi = self.rows  # the batch size is in the name: other batches may round the logits otherwise
        return f"e{self.epoch:04d}_r{lo:010d}-{hi:010d}_b{self.batch_size}"

    def path(self, root: str) -> str:
        return os.path.join(root, UNITS, self.name)


def plan_units(n: int, batch_size: int, epochs, world: int, unit_batches: int = 0) -> list:
    """The units of `epochs`, in build order. `unit_batches` 0: whole epochs when there are enough of them
    for every rank, else each epoch cut so that every rank gets about UNITS_PER_RANK units."""
    epochs = list(epochs)
    n_batches = -(-n // batch_size)
    if not unit_batches:
        per_epoch = 1 if world == 1 else min(n_batches, -(-UNITS_PER_RANK * world // max(1, len(epochs))))
        unit_batches = -(-n_batches // per_epoch)
    return [Unit(e, b, min(b + unit_batches, n_batches), batch_size, n)
            for e in epochs for b in range(0, n_batches, unit_batches)]


def unit_writer(root: str, unit: Unit, c: int, precision: str, topk: int, temperature: float, seed: int):
    os.makedirs(os.path.join(root, UNITS), exist_ok=True)
    return RowWriter(unit.path(root), unit.epoch, unit.n, c, precision, topk, temperature, seed, rows=unit.rows)


def present_units(root: str) -> set:
    d = os.path.join(root, UNITS)
    return {name for name in os.listdir(d) if not name.startswith(".")} if os.path.isdir(d) else set()


# ---- sizes ---------------------------------------------------------------------------------------
def npy_header(dtype, shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _checksums_text(sums: dict) -> str:
    return json.dumps(sums, indent=1, sort_keys=True) + "\n"


def epoch_files(n: int, c: int, precision: str, topk: int) -> dict:
    """file name -> its exact size in bytes, `checksums.json` included (its CRCs have a fixed width)."""
    sizes = {f"{name}.npy": len(npy_header(dt, shape)) + np.dtype(dt).itemsize * math.prod(shape)
             for name, (dt, shape) in array_specs(n, c, precision, topk).items()}
    sums = {name: {"bytes": size, "crc32": "0" * 8} for name, size in sizes.items()}
    return {**sizes, CHECKSUMS: len(_checksums_text(sums).encode())}


def epoch_disk_bytes(n: int, c: int, precision: str, topk: int, block: int = 1) -> int:
    """One epoch's bytes: its files' contents, or with `block` (the file system's allocation unit) the space
    they take, each file rounded up to whole blocks (what makes the tiny demo cache larger on disk)."""
    return sum(-(-size // block) * block for size in epoch_files(n, c, precision, topk).values())


def block_size(path: str) -> int:
    try:
        return max(1, os.statvfs(path).f_frsize)
    except (OSError, AttributeError):
        return 4096


# ---- assembly ------------------------------------------------------------------------------------
def assemble_epoch(root: str, epoch: int, units: list, c: int, precision: str, topk: int, seed: int) -> None:
    """Concatenates an epoch's units (in row order) into `epoch_NNNN/` with its checksums, then drops them."""
    n = units[0].n
    tmp = os.path.join(root, f".epoch_{epoch:04d}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    sums = {}
    try:
        os.makedirs(tmp)
        for name, (dt, shape) in array_specs(n, c, precision, topk).items():
            path = os.path.join(tmp, f"{name}.npy")
            with open(path, "wb") as f:
                crc, size = 0, 0
                for chunk in _file_chunks(root, name, dt, shape, units, seed):
                    f.write(chunk)
                    crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                f.flush()
                os.fsync(f.fileno())
            sums[f"{name}.npy"] = {"bytes": size, "crc32": f"{crc:08x}"}
        with open(os.path.join(tmp, CHECKSUMS), "w") as f:
            f.write(_checksums_text(sums))
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(epoch_dir(root, epoch), ignore_errors=True)
        os.rename(tmp, epoch_dir(root, epoch))
        fsync_path(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(epoch_dir(root, epoch)):
            raise e from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for u in units:
        shutil.rmtree(u.path(root), ignore_errors=True)


def _file_chunks(root, name, dt, shape, units, seed):
    yield npy_header(dt, shape)
    if name == "order":
        yield epoch_order(units[0].n, seed, units[0].epoch).numpy().astype(dt).tobytes()
        return
    for u in units:
        path = os.path.join(u.path(root), f"{name}.npy")
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CacheError(f"{path}: missing, truncated or corrupt unit ({e}); run the same command again") from None
        lo, hi = u.rows
        if a.dtype != np.dtype(dt) or a.shape != (hi - lo, *shape[1:]):
            raise CacheError(f"{path}: holds {a.dtype}{list(a.shape)}, expected {np.dtype(dt)}"
                             f"{[hi - lo, *shape[1:]]}; run the same command again")
        step = max(1, _COPY_ROWS_BYTES // max(1, a[:1].nbytes))
        for i in range(0, len(a), step):
            yield np.ascontiguousarray(a[i:i + step]).tobytes()


# ---- verify --------------------------------------------------------------------------------------
def file_crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def verify_cache(root: str) -> dict:
    """Every epoch of the cache in `root` against its recorded checksums, shapes and the fingerprint; raises a
    CacheError naming the first bad file. {"epochs", "bytes", "unchecked": epochs without checksums}."""
    meta = read_meta(root)
    if meta is None:
        raise CacheError(f"{root}: no meta.json (not a teacher cache, or its build never completed)")
    fp = meta.get("fingerprint")
    keys = ("format", "num_samples", "num_classes", "precision", "topk", "seed")
    if not isinstance(fp, dict) or any(k not in fp for k in keys):
        raise CacheError(f"{root}/meta.json: no fingerprint, or one without {', '.join(keys)}")
    if fp["format"] != FORMAT:
        raise CacheError(f"{root}: cache format {fp['format']}, this code reads format {FORMAT}")
    n, c, precision, topk = fp["num_samples"], fp["num_classes"], fp["precision"], fp["topk"]
    if (meta.get("num_samples"), meta.get("num_classes")) != (n, c):
        raise CacheError(f"{root}/meta.json: {meta.get('num_samples')} samples x {meta.get('num_classes')} classes, "
                         f"its fingerprint says {n} x {c}")
    total, unchecked = 0, []
    for e in range(int(meta["epochs"])):
        d = epoch_dir(root, e)
        if not os.path.isdir(d):
            raise CacheError(f"{d}: missing (meta.json records {meta['epochs']} epochs)")
        check_epoch_files(root, e, n, c, precision, topk)
        side = os.path.join(d, CHECKSUMS)
        if not os.path.exists(side):
            unchecked.append(e)  # built before checksums were recorded: shapes and sizes only
            continue
        try:
            with open(side) as f:
                sums = json.load(f)
        except (OSError, ValueError) as err:
            raise CacheError(f"{side}: unreadable ({err})") from None
        for name in sorted(set(sums) | {f"{k}.npy" for k in array_specs(n, c, precision, topk)}):
            path = os.path.join(d, name)
            if name not in sums:
                raise CacheError(f"{path}: no checksum recorded for it in {CHECKSUMS}")
            got = file_crc32(path) if os.path.exists(path) else "no file"
            if got != sums[name].get("crc32"):
                raise CacheError(f"{path}: CRC-32 {got}, {sums[name].get('crc32')} recorded when it was built "
                                 f"(the file changed since)")
            total += os.path.getsize(path)
    return {"epochs": int(meta["epochs"]), "bytes": total, "unchecked": unchecked}


def stale_entries(root: str) -> list:
    """Temp files of killed builders: their units, epochs and metadata, never complete."""
    found = [os.path.join(root, x) for x in os.listdir(root) if re.match(r"\.(epoch_\d{4}|meta\.json|build\.json)\.tmp", x)]
    d = os.path.join(root, UNITS)
    if os.path.isdir(d):
        found += [os.path.join(d, x) for x in os.listdir(d) if x.startswith(".")]
    return found
