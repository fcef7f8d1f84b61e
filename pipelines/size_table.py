"""On-disk cache of a folder source's image-size table (`sources.image_sizes`), so that a start on a folder
already seen stats each file instead of reading its header.

One `.npz` per folder: the files' names relative to the folder, their (st_size, st_mtime_ns) when their header
was read, and (height, width). It lives beside the data (`<root>/.crld_sizes.npz`: a file, and FolderSource
takes only folders as classes) or, when the folder is read-only, under `$XDG_CACHE_HOME/crld` (default
`~/.cache/crld`) named by a hash of the folder's absolute path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from typing import List, Sequence, Tuple

import numpy as np

from common.files import save_atomic, user_cache_dir

log = logging.getLogger(__name__)

# Bump when the stored arrays' meaning or layout changes: older files are then ignored and rewritten.
_VERSION = 1
_FILE = ".crld_sizes.npz"
_unwritable_logged = set()


def cache_paths(root: str) -> List[str]:
    """Where a folder's table is looked for, in order; it is written to the first that takes it."""
    key = hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest()[:16]
    return [os.path.join(root, _FILE), os.path.join(user_cache_dir(), f"sizes-{key}.npz")]


def relative_names(files: Sequence[str], root: str) -> List[str]:
    # slicing, not os.path.relpath: relpath per file would cost seconds on ImageNet
    prefix = os.path.join(root, "")
    return [f[len(prefix):] if f.startswith(prefix) else f for f in files]


def _encode(names: Sequence[str]) -> np.ndarray:
    # one blob instead of a string array: numpy's fixed-width unicode would take 4 bytes a character
    # times the longest name; surrogateescape round-trips names that are not UTF-8, as os.fsencode does
    return np.frombuffer("\0".join(names).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _decode(blob: np.ndarray) -> List[str]:
    return blob.tobytes().decode("utf-8", "surrogateescape").split("\0") if blob.size else []


def _read(path: str):
    with np.load(path, allow_pickle=False) as z:
        if int(z["version"]) != _VERSION:
            raise ValueError(f"version {int(z['version'])}, not {_VERSION}")
        names, stat, hw = _decode(z["names"]), z["stat"], z["hw"]
    if stat.shape != (len(names), 2) or hw.shape != (len(names), 2):
        raise ValueError("arrays of different lengths")
    return names, stat.astype(np.int64), hw.astype(np.int64)


def load(root: str, names: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(stat, hw), each (N, 2) int64 aligned with `names`: what the cache holds for each file, stat -1 where
    it holds nothing. A missing, corrupt or outdated file reads as empty (it is rewritten later)."""
    stat, hw = np.full((len(names), 2), -1, dtype=np.int64), np.zeros((len(names), 2), dtype=np.int64)
    # newest first: a folder made read-only after its table was written beside it has a newer one in the user
    # cache, and the stale one beside the data must not be read (and rewritten) at every start
    found = [p for p in cache_paths(root) if os.path.isfile(p)]
    for path in sorted(found, key=os.path.getmtime, reverse=True):
        try:
            old_names, old_stat, old_hw = _read(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log.info("ignoring unreadable image-size cache %s (%s)", path, e)
            continue
        if old_names == names:  # the usual start: the same file list
            return old_stat, old_hw
        row = {n: i for i, n in enumerate(old_names)}
        at = np.fromiter((row.get(n, -1) for n in names), dtype=np.int64, count=len(names))
        hit = at >= 0
        stat[hit], hw[hit] = old_stat[at[hit]], old_hw[at[hit]]
        return stat, hw
    return stat, hw


def store(root: str, names: List[str], stat: np.ndarray, hw: np.ndarray):
    """Writes the rows whose size was read (hw > 0): a file that failed is read again at the next start, so
    its error (strict mode) or its substitution (skip mode) is never hidden by the cache."""
    good = (hw > 0).all(axis=1)
    arrays = dict(version=np.int64(_VERSION), names=_encode([n for n, g in zip(names, good) if g]),
                  stat=stat[good], hw=hw[good])
    for path in cache_paths(root):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_atomic(path, lambda f: np.savez(f, **arrays), prefix=".crld_sizes-")
            return path
        except OSError as e:
            log.debug("cannot write the image-size cache %s (%s)", path, e)
    if root not in _unwritable_logged:
        _unwritable_logged.add(root)
        log.info("no writable image-size cache for %s (%s): file headers are read at every start",
                 root, " or ".join(cache_paths(root)))
    return None
