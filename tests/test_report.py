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


def make_seed_run(path, top1s, seed, init_seed=None, **cfg_changes):
    """A finished run with its resolved config.yaml (as train.py writes it: model.init_seed resolved)."""
    make_run(path, top1s, method="crld")
    cfg = {"data": {"dataset": "demo", "subset": 0}, "model": {"name": "resnet8", "init_seed": seed},
           "method": {"name": "crld", "temperature": 4.0}, "optim": {"lr": 0.05, "epochs": len(top1s)},
           "run": {"name": os.path.basename(path), "out_dir": os.path.dirname(path), "seed": seed,
                   "progress": True}}
    if init_seed is not None:
        cfg["model"]["init_seed"] = init_seed
    for dotted, v in cfg_changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = v
    with open(os.path.join(path, "config.yaml"), "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return str(path)


def table(md):
    return {line.split(" | ")[0][2:]: line.split(" | ") for line in md.splitlines()
            if line.startswith("| ") and "---" not in line and not line.startswith("| run |")}


def test_runs_differing_only_in_seeds_share_a_row(tmp_path, capsys):
    parent = tmp_path / "seeds"
    for s, (best, last) in enumerate([(70.0, 69.0), (72.0, 71.0), (74.0, 73.0)]):
        make_seed_run(parent / f"crld_s{s}", [50.0, best, last], seed=s, run__progress=s != 1)
    make_seed_run(parent / "lr_s0", [50.0, 60.0, 59.0], seed=0, optim__lr=0.1)  # another experiment
    make_seed_run(parent / "lr_s1", [50.0, 62.0, 61.0], seed=1, optim__lr=0.1)
    make_seed_run(parent / "init_1", [50.0, 65.0, 64.0], seed=0, init_seed=1, method__temperature=2.0)
    make_seed_run(parent / "init_2", [50.0, 66.0, 65.0], seed=0, init_seed=2, method__temperature=2.0)
    make_seed_run(parent / "fixed_init_s1", [50.0, 40.0, 40.0], seed=1, init_seed=9, data__subset=5)
    make_seed_run(parent / "fixed_init_s2", [50.0, 42.0, 42.0], seed=2, init_seed=9, data__subset=5)
    make_seed_run(parent / "short_s3", [50.0, 60.0], seed=3)  # stopped at epoch 2: not a seed of the others
    make_seed_run(parent / "again_s0", [50.0, 10.0, 10.0], seed=0, data__dataset="x")  # same seed twice:
    make_seed_run(parent / "again_s0b", [50.0, 11.0, 11.0], seed=0, data__dataset="x")  # rows stay apart
    runs = [report.load_run(r, os.path.relpath(r, parent)) for r in report.find_runs([str(parent)])]
    rows = table(report.summary_md(runs, "t", "seeds"))
    assert set(rows) == {"crld_s0 … crld_s2", "lr_s0, lr_s1", "init_1, init_2", "fixed_init_s1, fixed_init_s2",
                         "short_s3", "again_s0", "again_s0b"}
    r = rows["crld_s0 … crld_s2"]
    assert r[4] == "3: run.seed 0,1,2" and r[5] == "72.00 ± 2.00" and r[6] == "71.00 ± 2.00 / 76.00 ± 2.00"
    assert rows["lr_s0, lr_s1"][5] == "61.00 ± 1.41"  # sample standard deviation (n - 1)
    assert rows["init_1, init_2"][4] == "2: model.init_seed 1,2"
    assert rows["fixed_init_s1, fixed_init_s2"][4] == "2: run.seed, init fixed 1,2"
    assert rows["short_s3"][4] == rows["again_s0"][4] == "1" and rows["short_s3"][5] == "60.00 (2)"
    # the command line says which rows it averaged
    report.main([str(parent), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "(12 run(s); 4 row(s) averaged over seeds)" in out
    assert "crld_s0 … crld_s2: 3: run.seed 0,1,2: best top-1 72.00 ± 2.00, last top-1 71.00 ± 2.00" in out
    assert "seeds" in (tmp_path / "out" / "summary.md").read_text()


def test_group_students_differing_in_init_seed_share_a_row(tmp_path):
    """A group's students: student<k>/config.yaml, labelled with their overrides from group.json."""
    group = tmp_path / "grp"
    for k in range(3):
        make_seed_run(group / f"student{k}", [50.0, 60.0 + k], seed=0, init_seed=k)
    with open(group / "group.json", "w") as f:
        json.dump({"students": [{"dir": "student0", "overrides": {}}] +
                   [{"dir": f"student{k}", "overrides": {"model.init_seed": k}} for k in (1, 2)]}, f)
    runs = [report.load_run(r, os.path.relpath(r, tmp_path)) for r in report.find_runs([str(group)])]
    rows = table(report.summary_md(runs, "t", "x"))
    assert list(rows) == ["grp/student0 … grp/student2 (model.init_seed=2)"]
    assert rows["grp/student0 … grp/student2 (model.init_seed=2)"][4] == "3: model.init_seed 0,1,2"
