"""Progress bars that read well in a log: tqdm on a terminal, whole periodic lines elsewhere.

tqdm redraws its bar with carriage returns every 0.1 s; written to a file or pipe (CI, `nohup`, SLURM
logs) every redraw stays, so a stage that takes a while to start leaves hundreds of identical 0% lines.
`progress(...)` takes tqdm's arguments and returns tqdm itself when the stream is a terminal, otherwise a
`LineProgress`: one plain line when the count has moved and `line_interval` seconds have passed, and one
at the end.
"""
from __future__ import annotations

import math
import sys

from tqdm import tqdm

LINE_INTERVAL_S = 30.0


class LineProgress(tqdm):
    """tqdm for files and pipes: newline-terminated status lines, never a redraw, never a repeat."""

    def __init__(self, *args, line_interval: float = LINE_INTERVAL_S, **kwargs):
        self._line_interval, self._line_n, self._line_t = line_interval, 0, -math.inf
        kwargs.update(leave=False, dynamic_ncols=False)  # close() then asks display('') for the last line
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        closing = msg == "" and self.disable  # close() disables the bar before its last display
        if msg not in (None, "") or self.n == self._line_n:
            return False
        now = self._time()
        if not closing and now - self._line_t < self._line_interval:
            return False
        self._line_n, self._line_t = self.n, now
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        return False  # True would make close() write a carriage return

    def clear(self, nolock=False):
        """Nothing to erase: tqdm.write() clears bars before printing."""

    def moveto(self, n):
        """Lines are never overwritten, so there is no cursor to move."""


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(*args, line_interval: float = LINE_INTERVAL_S, **kwargs):
    """A tqdm bar on a terminal, a `LineProgress` on anything else (same arguments as tqdm)."""
    if _is_terminal(kwargs.get("file") or sys.stderr):
        return tqdm(*args, **kwargs)
    return LineProgress(*args, line_interval=line_interval, **kwargs)
