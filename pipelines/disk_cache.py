"""What the on-disk caches beside the data share (the decoded arrays of `pipelines.gpu_backend`, the
image-size table of `pipelines.size_table`): the user cache folder used when the data folder is read-only,
and the write that never leaves a half-written file under a cache's name."""
from __future__ import annotations

import os
import tempfile


def user_cache_dir() -> str:
    """`$XDG_CACHE_HOME/crld`, by default `~/.cache/crld`."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "crld")


def save_atomic(path: str, write, prefix: str = ".tmp-"):
    """`write(f)` into a unique temporary file in `path`'s folder (which must exist), then renamed over
    `path`: concurrent writers (DDP ranks starting together, two runs on one folder) each replace the file
    whole, and a reader sees one complete file or another. The temporary name starts with a dot, so a
    folder listing of the data (FolderSource skips dot-files) never takes it for an image."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
