"""Counting the Python function calls a process makes, in all its threads, during chosen windows.

The data path's host cost on a GPU machine is Python work in the training process (it competes with
the step's kernel launches for the interpreter lock), and it is predicted by how that work grows with
the batch size: `python -m bench loader` reports calls per batch, and the tests assert that the device
route's count does not grow with the batch. The hook covers the installing thread and every thread
started afterwards (Python 3.12+: all threads), so `calls_per_batch` counts in a fresh interpreter.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import threading
import time
import traceback


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


def calls_per_batch(make_iter, batch_sizes, warmup: int = 2, batches: int = 2) -> list:
    """Python calls per `next()` of `make_iter(batch_size)`'s iterator for each batch size, over `batches`
    batches after `warmup` ones, in a fresh interpreter (spawned): the hook is installed before anything
    starts a thread there, so every thread the loaders use is seen. `make_iter` must be importable. The
    child is an ordinary process, so its loaders may start worker processes of their own."""
    return calls_per_batch_each([make_iter], batch_sizes, warmup, batches)[0]


def calls_per_batch_each(make_iters, batch_sizes, warmup: int = 2, batches: int = 2) -> list:
    """`calls_per_batch` of each of `make_iters` (a list per make_iter, in order), all counted in one
    spawned interpreter, so that its start-up (torch's and the backends' imports) is paid once. Each count
    still starts from a fresh iterator; between two make_iters the previous one's iterators are closed and
    collected and its leftover threads must fall quiet (`_settle`) before the next one is counted."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_report, args=(send, list(make_iters), list(batch_sizes), warmup, batches))
    child.start()
    send.close()
    try:
        ok, value = recv.recv()
    except EOFError:
        ok, value = False, f"the counting process died (exit code {child.join() or child.exitcode})"
    child.join()
    if not ok:
        raise RuntimeError(f"counting Python calls failed: {value}")
    return value


def _report(send, make_iters, batch_sizes, warmup, batches):
    try:
        send.send((True, _count_in_this_process(make_iters, batch_sizes, warmup, batches)))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        send.send((False, "".join(traceback.format_exception(e))[-2000:]))
    send.close()
    # Leave without finalising the interpreter: loaders stopped mid-epoch still have native threads
    # (DALI's, FFCV's) that abort the process if torn down under them; the result is already sent.
    os._exit(0)


def _count_in_this_process(make_iters, batch_sizes, warmup, batches):
    out = []
    with CallCounter() as counter:
        for k, make_iter in enumerate(make_iters):
            if k:
                _settle(counter, make_iters[k - 1])
            out.append([])
            for bs in batch_sizes:
                counter.calls = 0
                it = make_iter(bs)
                for _ in range(warmup):
                    next(it)
                with counter.window():
                    for _ in range(batches):
                        next(it)
                out[-1].append(counter.calls / batches)
                if hasattr(it, "close"):
                    it.close()
                del it
    return out


def _settle(counter, previous, quiet_s: float = 0.1, timeout_s: float = 10.0):
    """Collect what `previous` left and wait until its leftover threads make no Python calls for `quiet_s`
    (idle pool workers are fine); raises if they keep calling for `timeout_s`, as those calls would land in
    the next make_iter's windows."""
    gc.collect()
    deadline = time.monotonic() + timeout_s
    while True:
        counter.calls = 0
        with counter.window():
            time.sleep(quiet_s)
        if counter.calls <= 1:  # the window's own __exit__
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{previous}'s threads still make Python calls {timeout_s:.0f} s after its counts "
                               f"({counter.calls} in the last {quiet_s} s)")
