"""report.py: plots and a Markdown table from fake run folders; bad input is a one-line error with nothing written."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import report
from training.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(path, top1s, method="kd", teacher=None, summary=True, extra=None):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for e, t in enumerate(top1s, 1):
            row = {"epoch": e, "val_top1": t, "val_top5": t + 5, "train_loss": 3.0 / e, "train_ce": 1.0 / e,
                   "lr": 0.1 / e, "samples_per_s": 100.0 * e, "epoch_time_s": 2.0, **(extra or {})}
            f.write(json.dumps(row) + "\n")
    if summary:
        best = max(top1s)
        s = {"model": "resnet8", "method": method, "epochs": len(top1s), "best_top1": best,
             "best_epoch": top1s.index(best) + 1, "last_top1": top1s[-1], "last_top5": top1s[-1] + 5,
             "wall_time_s": 2.0 * len(top1s), "samples_per_s": 200.0}
        if teacher is not None:
            s["teacher_top1"] = teacher
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump(s, f)
    return str(path)


@pytest.fixture
def runs(tmp_path):
    parent = tmp_path / "sweep"
    make_run(parent / "kd_seed0", [40.0, 71.25, 70.5], teacher=80.125, extra={"train_kd": 2.0})
    make_run(parent / "crld" / "seed1", [35.0, 55.5, 66.75, 64.0], method="crld", summary=False)
    return parent


def check_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= 800 and im.size[1] >= 600
        im.verify()


def test_report_from_parent_folder(runs, tmp_path):
    out = tmp_path / "out"
    report.main([str(runs), "--out", str(out), "--title", "Sweep"])
    assert sorted(os.listdir(out)) == ["curves.png", "summary.md"]
    check_png(out / "curves.png")
    md = (out / "summary.md").read_text()
    assert md.startswith("# Sweep")
    assert "![training curves](curves.png)" in md
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"run", "kd_seed0", "crld/seed1"}  # labels relative to the common parent
    assert "71.25 (2)" in rows["kd_seed0"] and "80.12" in rows["kd_seed0"] and "| kd | resnet8 |" in rows["kd_seed0"]
    assert "66.75 (3)" in rows["crld/seed1"]  # no summary.json: best taken from metrics.jsonl
    assert "64.00 / 69.00" in rows["crld/seed1"] and "250" in rows["crld/seed1"]  # last, mean samples/s


def test_report_from_run_dirs_and_rerun_overwrites(runs, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        report.main([str(runs / "kd_seed0"), str(runs / "crld" / "seed1"), "--out", str(out)])
    assert sorted(os.listdir(out)) == ["curves.png", "summary.md"]  # no temp files left behind
    check_png(out / "curves.png")


def run_cli(argv, capsys):
    rc = run_main(lambda: report.main(argv))
    return rc, capsys.readouterr().err.strip()


def test_missing_dir(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli([str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert rc == 2 and err == f"error: {tmp_path / 'nope'}: no such file or directory"
    assert not out.exists()


def test_dir_without_metrics(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    rc, err = run_cli([str(tmp_path / "empty_run"), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "empty_run" in err and "no metrics.jsonl" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, expect", [
    ('{"epoch": 1, "val_top1": 5}\n{"epoch": 2, "val_top1": \n', "line 2: malformed JSON"),
    ('{"epoch": 1}\n\n{"epoch": 2}\n', "line 2: empty line"),
    ('[1, 2]\n', "line 1: not a JSON object"),
    ("", "empty"),
])
def test_bad_metrics_leaves_no_outputs(runs, tmp_path, capsys, content, expect):
    bad = runs / "crld" / "seed1" / "metrics.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated")
    rc, err = run_cli([str(runs), "--out", str(out)], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {bad}: ") and expect in err
    assert os.listdir(out) == ["keep.txt"]


def test_script_exit_code(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), str(tmp_path / "nope"), "--out",
                        str(tmp_path / "out")], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "nope" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()
