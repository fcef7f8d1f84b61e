"""Stop signals: a cluster's time limit or preemption notice (SLURM `--signal=USR1@90`, SIGTERM at the limit or
on preemption, Kubernetes' SIGTERM) asks the run to stop at the next step boundary with a checkpoint there.

The trainer finishes the current step, writes every student's `last.pt` at that step (under DDP once all ranks
agree on it, at the next logging sync) and leaves with EXIT_PREEMPTED, so a job script can requeue itself and
`--resume` continues from that step. A second signal ends the process at once. The main process also leaves
`RUN_DIR/preempted.json` (which signal, after which step): the job script's test under torchrun, which reports a
worker's exit code as its own failure. The next start of the run removes it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from common.files import save_json_atomic, writing

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped, not failed; run it again with --resume
MARKER = "preempted.json"
SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoints."""


class StopRequest:
    """Which signal asked the run to stop (None: none yet). Handlers are installed from the main thread only
    (elsewhere Python cannot install them) and restored by `uninstall`."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signal is not None:  # asked twice: go now, as the signal's default action does
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signal.Signals(signum).name
        log.warning("%s received: stopping after this step with a checkpoint (a second signal stops at once)",
                    self.signal)


def mark_preempted(run_dir: str, reason: str, resume: str = "train.py ... --resume") -> None:
    doc = {"reason": reason, "exit_code": EXIT_PREEMPTED, "resume": resume}
    save_json_atomic(os.path.join(run_dir, MARKER), doc)


def clear_preempted(run_dir: str) -> None:
    """A run that starts again is no longer a preempted one: a crash after this leaves no marker to requeue on."""
    path = os.path.join(run_dir, MARKER)
    with writing(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
