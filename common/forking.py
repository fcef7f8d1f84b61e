"""Forking worker processes from a process that has run DALI.

A forked child inherits the parent's objects, garbage included. When the child's garbage collector finalises
an inherited DALI pipeline, the pipeline's destructor waits for executor threads that do not exist in the
child: the child hangs (or crashes), and a parent waiting for it (FFCV's writer, a DataLoader) waits forever.
So the parent collects its own garbage first, where a pipeline can shut down, and freezes what is left for the
time it forks: frozen objects are never examined by a collection, in the parent or in the children."""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def fork_safely():
    """Around the code that starts worker processes by fork."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
