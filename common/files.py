"""What the files written beside the data and the runs share: the user cache folder used when the data folder
is read-only, and the writes that never leave a half-written file or folder under its final name (caches,
checkpoints, sidecars, converted datasets)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile

from common.errors import OutputError

# mkstemp / mkdtemp create owner-only entries; what they become gets the mode a plain open / makedirs gives
_UMASK = os.umask(0)
os.umask(_UMASK)


def user_cache_dir() -> str:
    """`$XDG_CACHE_HOME/crld`, by default `~/.cache/crld`."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "crld")


def human(b: float) -> str:
    """A byte count in the unit that shows it: `512 B`, `3.9 KiB`, `1.5 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


_OUTPUT_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _existing_ancestor(path: str) -> str:
    """`path`, or the nearest of its parents that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _blocking_file(path: str, itself: bool = False):
    """The regular file (or other non-folder) that `path` runs through (`itself`: or is), or None."""
    path = os.path.abspath(path)
    if itself and os.path.lexists(path) and not os.path.isdir(path):
        return path
    parent = os.path.dirname(path)
    while parent != path:
        if os.path.lexists(parent) and not os.path.isdir(parent):
            return parent
        path, parent = parent, os.path.dirname(parent)
    return None


def output_error(err: OSError, path: str, need=None) -> OutputError:
    """`err`, raised writing `path`, as one line naming the path and what writing it needs. `need`: the bytes it
    needs, or a function that counts them (called only for a full disk)."""
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{human(shutil.disk_usage(_existing_ancestor(path)).free)} free"
        except OSError:
            free = "free space unknown"
        need = need() if callable(need) else need
        size = f"needs {human(need)}, " if need else ""
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on its file system"
        return OutputError(f"cannot write {path}: {what} ({size}{free}); free some space or write elsewhere")
    in_the_way = code in (errno.ENOTDIR, errno.ENOENT, errno.EEXIST)
    blocker = _blocking_file(path, itself=code == errno.EEXIST) if in_the_way else None
    if blocker:
        return _in_the_way(path, blocker)
    if code == errno.EROFS:
        return OutputError(f"cannot write {path}: its file system is read-only; it needs a folder on a writable one")
    if code in (errno.EACCES, errno.EPERM):
        folder = path if os.path.isdir(path) else _existing_ancestor(os.path.dirname(os.path.abspath(path)))
        return OutputError(f"cannot write {path}: permission denied; it needs write permission on {folder}")
    return OutputError(f"cannot write {path}: {err.strerror or err}")


@contextlib.contextmanager
def writing(path: str, need=None):
    """Writes to `path` in the block: an OSError becomes an `OutputError` (one line, exit 2) that names it."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise output_error(e, path, need) from None


def _in_the_way(path: str, blocker: str) -> OutputError:
    return OutputError(f"cannot write {path}: {blocker} is a file, not a folder; choose another output path")


def check_writable(path: str) -> None:
    """Refuses at once an output path that cannot be created or written (under a regular file, on a read-only
    file system, in a folder without write permission), before anything costly runs; writes nothing."""
    base = _existing_ancestor(path)
    if not os.path.isdir(base):
        raise _in_the_way(path, base)
    # a real write: root passes os.access whatever the mode bits say
    with writing(path):
        tempfile.TemporaryFile(dir=base).close()


@contextlib.contextmanager
def atomic_path(path: str, prefix: str = ".tmp-", fsync: bool = False, need=None):
    """A unique temporary file's name in `path`'s folder (which must exist), for the block to write; renamed
    over `path` when the block completes, removed when it raises. Concurrent writers (DDP ranks starting
    together, two runs on one folder) each replace the file whole, and a reader sees one complete file or
    another. The default name starts with a dot, so a folder listing of the data (FolderSource skips
    dot-files) never takes it for an image. `fsync`: the data is on disk before the rename, so a crash right
    after cannot leave an empty file under the name, and the rename before it returns (checkpoints, cache
    metadata). A fault of its own is an `OutputError` (`writing`)."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=prefix, suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        yield tmp
        with writing(path, need):
            if fsync:
                fsync_path(tmp)
            os.replace(tmp, path)
            if fsync:
                fsync_path(os.path.dirname(path) or ".")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(path: str, write, prefix: str = ".tmp-", fsync: bool = False, need=None):
    """`write(f)` into a binary file that appears under `path` whole or not at all (`atomic_path`); a fault
    (a full disk) is an `OutputError` naming `path` and `need`, its bytes (an int or a function counting them)."""
    with writing(path, need), atomic_path(path, prefix, fsync, need) as tmp, open(tmp, "wb") as f:
        write(f)


def save_json_atomic(path: str, doc, prefix: str = ".tmp-", fsync: bool = False) -> None:
    data = (json.dumps(doc, indent=1) + "\n").encode()
    save_atomic(path, lambda f: f.write(data), prefix, fsync, need=len(data))


def fsync_path(path: str) -> None:
    """A file's data, or a folder's entries, on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(out: str):
    """A fresh temporary folder beside `out` for the block to fill; renamed to `out` when the block completes
    (replacing an earlier `out`), removed when it raises, so nothing half-written ever looks finished."""
    parent = os.path.dirname(os.path.abspath(out))
    with writing(out):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(os.path.normpath(out)) + ".tmp-")
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        with writing(out):
            if os.path.isdir(out):
                shutil.rmtree(out)
            os.rename(tmp, out)
    except OSError as e:
        # the block also reads its sources: only its faults writing into the folder are output faults
        if not isinstance(e, OutputError) and (e.errno in _OUTPUT_FAULTS or str(e.filename or "").startswith(tmp)):
            raise output_error(e, out) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
