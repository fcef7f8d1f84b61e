"""What the files written beside the data and the runs share: the user cache folder used when the data folder
is read-only, and the writes that never leave a half-written file or folder under its final name (caches,
checkpoints, sidecars, converted datasets)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

# mkstemp / mkdtemp create owner-only entries; what they become gets the mode a plain open / makedirs gives
_UMASK = os.umask(0)
os.umask(_UMASK)


def user_cache_dir() -> str:
    """`$XDG_CACHE_HOME/crld`, by default `~/.cache/crld`."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "crld")


@contextlib.contextmanager
def atomic_path(path: str, prefix: str = ".tmp-", fsync: bool = False):
    """A unique temporary file's name in `path`'s folder (which must exist), for the block to write; renamed
    over `path` when the block completes, removed when it raises. Concurrent writers (DDP ranks starting
    together, two runs on one folder) each replace the file whole, and a reader sees one complete file or
    another. The default name starts with a dot, so a folder listing of the data (FolderSource skips
    dot-files) never takes it for an image. `fsync`: the data is on disk before the rename, so a crash right
    after cannot leave an empty file under the name (checkpoints)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=prefix, suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(path: str, write, prefix: str = ".tmp-", fsync: bool = False):
    """`write(f)` into a binary file that appears under `path` whole or not at all (`atomic_path`)."""
    with atomic_path(path, prefix, fsync) as tmp, open(tmp, "wb") as f:
        write(f)


@contextlib.contextmanager
def atomic_folder(out: str):
    """A fresh temporary folder beside `out` for the block to fill; renamed to `out` when the block completes
    (replacing an earlier `out`), removed when it raises, so nothing half-written ever looks finished."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(os.path.normpath(out)) + ".tmp-")
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
