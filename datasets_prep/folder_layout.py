"""Write an ImageFolder tree of links or copies atomically: built under a temporary name beside the
output, renamed when complete, removed on any failure, so nothing half-written ever looks finished."""
import os
import shutil
from typing import Iterable, Tuple

from common.errors import OutputError
from common.files import atomic_folder
from pipelines.sources import DataError


def materialize(out: str, folders: Iterable[str], files: Iterable[Tuple[str, str]], copy: bool,
                marker: str, marker_text: str = "") -> None:
    """Create `out` holding `folders` (relative) and `files` ((source, relative destination)): symbolic
    links to the sources, or copies with `copy`; `marker` (relative) is written last, then the rename.
    `out` must not exist."""
    try:
        with atomic_folder(out) as tmp:
            for d in folders:
                os.makedirs(os.path.join(tmp, d), exist_ok=True)
            for path, rel in files:
                dst = os.path.join(tmp, rel)
                shutil.copyfile(path, dst) if copy else os.symlink(path, dst)
            with open(os.path.join(tmp, marker), "w") as f:
                f.write(marker_text)
    except OutputError:
        raise
    except OSError as e:
        raise DataError(f"{out}: cannot write ({e.strerror or e}); nothing written") from None
