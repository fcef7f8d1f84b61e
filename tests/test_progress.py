"""Progress written to a file or pipe: plain lines, never a carriage-return redraw, never a repeated line."""
import io

import pytest
from tqdm import tqdm

from training.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdm_and_anything_else_plain_lines():
    assert type(progress(total=3, file=Terminal())) is tqdm
    assert isinstance(progress(total=3, file=io.StringIO()), LineProgress)


def test_a_stalled_bar_writes_nothing_and_progress_writes_whole_lines():
    out = io.StringIO()
    bar = progress(total=100, desc="writing", unit="img", file=out, line_interval=0)
    for _ in range(200):  # what FFCV's writer loop does while its workers start: update(0) every 0.1 s
        bar.update(0)
    assert out.getvalue() == ""
    bar.update(40)
    bar.set_postfix(loss="1.5")
    bar.update(60)
    bar.close()
    lines = out.getvalue().split("\n")
    assert "\r" not in out.getvalue() and lines[-1] == ""
    assert [ln.split("|")[0] for ln in lines[:-1]] == ["writing:  40%", "writing: 100%"]
    assert "100/100" in lines[1] and "loss=1.5" in lines[1]


def test_lines_are_periodic():
    clock = [0.0]
    out = io.StringIO()
    bar = LineProgress(total=10, file=out, line_interval=30)
    bar._time, bar.start_t, bar.last_print_t = (lambda: clock[0]), 0.0, 0.0
    for step in range(10):
        clock[0] = 10.0 * (step + 1)  # one step every 10 s: a line at most every 30 s
        bar.update(1)
    bar.close()
    counts = [int(ln.split("|")[2].split("/")[0]) for ln in out.getvalue().splitlines()]
    assert counts == [1, 4, 7, 10]


def test_prep_ffcv_into_a_pipe_writes_one_progress_line(demo_root, tmp_path, capfd):
    pytest.importorskip("ffcv")
    from datasets_prep.prep_ffcv import main as prep
    prep(["--format", "demo", "--src", demo_root, "--split", "test", "--out", str(tmp_path / "v.beton"),
          "--num-workers", "1"])
    err = capfd.readouterr().err
    assert "\r" not in err and [ln for ln in err.splitlines() if "writing" in ln] == [
        next(ln for ln in err.splitlines() if ln.startswith("writing: 100%"))]
