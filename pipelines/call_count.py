"""Counting the Python function calls a process makes, in all its threads, during chosen windows.

The data path's host cost on a GPU machine is Python work in the training process (it competes with
the step's kernel launches for the interpreter lock), and it is predicted by how that work grows with
the batch size: `bench.py loader` reports calls per batch, and the tests assert that the device
route's count does not grow with the batch. Install the counter before building the loader: the
hook covers the installing thread and every thread started afterwards (Python 3.12+: all threads).
"""
from __future__ import annotations

import sys
import threading


class CallCounter:
    """`with CallCounter() as c: ...; with c.window(): next(it)`: c.calls counts Python function
    calls (profile 'call' events, generator resumptions included) made inside windows, in any thread."""

    def __init__(self):
        self.calls, self._active, self._lock = 0, False, threading.Lock()

    def _hook(self, frame, event, arg):
        if event == "call" and self._active:
            with self._lock:
                self.calls += 1

    def __enter__(self):
        sys.setprofile(self._hook)
        if hasattr(threading, "setprofile_all_threads"):
            threading.setprofile_all_threads(self._hook)
        else:
            threading.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        if hasattr(threading, "setprofile_all_threads"):
            threading.setprofile_all_threads(None)
        else:
            threading.setprofile(None)

    class _Window:
        def __init__(self, owner):
            self.owner = owner

        def __enter__(self):
            self.owner._active = True

        def __exit__(self, *exc):
            self.owner._active = False

    def window(self):
        return CallCounter._Window(self)
