"""Group runs: several students from one data pass and one teacher pass, each exactly its solo run."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from training.checkpoint import safe_load
from training.cli import run_main
from training.config import ConfigError, load_group
from training.student import Student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a mix of architectures, methods and init seeds; student 0 is the base config (crld resnet8)
STUDENTS = ["model.name=resnet14", "method.name=kd", "method.name=ce model.init_seed=7 optim.lr=0.02"]


def base_args(demo_root, teacher_ckpt, out, *extra):
    return ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), f"data.root={demo_root}", f"run.out_dir={out}",
            "run.name=g", "data.subset=128", "pipeline.batch_size=32", "pipeline.val_batch_size=128",
            "pipeline.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "run.progress=false",
            "model.name=resnet8", "teacher.name=resnet8", f"teacher.ckpt={teacher_ckpt}", "run.deterministic=true",
            *extra]


def group_args(demo_root, teacher_ckpt, out, *extra):
    return base_args(demo_root, teacher_ckpt, out, *extra) + [a for s in STUDENTS for a in ("--student", s)]


def weights(path):
    return safe_load(str(path))["model"]


def metrics(folder):
    return [json.loads(x) for x in open(os.path.join(folder, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def group_run(demo_root, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("group")
    summaries = train.main(group_args(demo_root, teacher_ckpt, out))
    return out / "g", summaries


def test_each_student_equals_its_solo_run_bit_for_bit(group_run, tmp_path):
    run_dir, summaries = group_run
    assert [(s["model"], s["method"]) for s in summaries] == [
        ("resnet8", "crld"), ("resnet14", "crld"), ("resnet8", "kd"), ("resnet8", "ce")]
    for k in range(len(STUDENTS) + 1):
        mine = run_dir / f"student{k}"
        assert {"config.yaml", "run_info.json", "metrics.jsonl", "best.pt", "last.pt", "summary.json"} <= set(
            os.listdir(mine))
        # the student's own config.yaml trains it alone (into a folder beside the group's)
        solo = train.main(["--config", str(mine / "config.yaml"), f"run.out_dir={tmp_path}"])
        alone = tmp_path / f"g-student{k}" if k else tmp_path / "g"
        a, b = weights(mine / "last.pt"), weights(alone / "last.pt")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
        assert [m["train_loss"] for m in metrics(mine)] == [m["train_loss"] for m in metrics(alone)]
        assert solo["best_top1"] == summaries[k]["best_top1"]


def test_group_json_lists_students_with_overrides_and_figures(group_run):
    run_dir, summaries = group_run
    doc = json.load(open(run_dir / "group.json"))
    assert [s["dir"] for s in doc["students"]] == ["student0", "student1", "student2", "student3"]
    assert doc["students"][0]["overrides"] == {}
    assert doc["students"][1]["overrides"] == {"model.name": "resnet14"}
    assert doc["students"][3]["overrides"] == {"method.name": "ce", "model.init_seed": 7, "optim.lr": 0.02}
    assert [s["summary"]["best_top1"] for s in doc["students"]] == [s["best_top1"] for s in summaries]


def test_students_from_the_yaml_file_equal_students_from_the_command_line(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(f"_base_: {os.path.join(ROOT, 'configs/demo/crld.yaml')}\n"
                     "students:\n  - {model: {name: resnet14}}\n  - {method.name: kd, optim.lr: 0.1}\n")
    a = load_group(str(study))
    b = load_group(os.path.join(ROOT, "configs/demo/crld.yaml"), [],
                   ["model.name=resnet14", "method.name=kd optim.lr=0.1"])
    assert [(c.model.name, c.method.name, c.optim.lr) for c in a] == [(c.model.name, c.method.name, c.optim.lr)
                                                                       for c in b]
    assert [c.run.name for c in a] == ["study", "study-student1", "study-student2"]


@pytest.mark.parametrize("student, message", [
    ("pipeline.batch_size=16", "'pipeline.batch_size' is shared by the group"),
    ("optim.epochs=3", "'optim.epochs' is shared by the group"),
    ("run.seed=1", "'run.seed' is shared by the group"),
    ("model.nmae=resnet14", "unknown config key 'model.nmae'"),
    ("method.name=kdd", "unknown value 'kdd'"),
    ("model.name", "must look like section.key=value"),
])
def test_a_student_override_that_cannot_be_is_one_line_naming_the_key(demo_root, tmp_path, capsys, student, message):
    argv = ["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), f"run.out_dir={tmp_path}", "--student", student]
    assert run_main(lambda: train.main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not os.listdir(tmp_path)
    with pytest.raises(ConfigError):
        load_group(os.path.join(ROOT, "configs/demo/crld.yaml"), [], [student])


def test_kill_and_resume_of_a_group_matches_the_uninterrupted_group(demo_root, teacher_ckpt, tmp_path):
    """SIGKILL right after student 0 wrote epoch 1's last.pt: the others' last.pt are missing (they restart) or
    behind; on --resume a student ahead sits out until the others catch up, and every student ends equal to
    the uninterrupted group (each run its own process, as the kill needs: a process's thread settings and
    deterministic flags are part of what makes two runs bit-identical)."""
    full = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *group_args(
        demo_root, teacher_ckpt, tmp_path / "full")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    argv = group_args(demo_root, teacher_ckpt, tmp_path)
    env = {**os.environ, "CRLD_TEST_KILL_AFTER_EPOCH": "1"}
    killed = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_worker.py"), *argv], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert os.path.isfile(tmp_path / "g" / "student0" / "last.pt")
    assert not os.path.isfile(tmp_path / "g" / "student1" / "last.pt")
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--resume"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for k in range(len(STUDENTS) + 1):
        a, b = (weights(tmp_path / run / f"student{k}" / "last.pt") for run in ("full/g", "g"))
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
        assert [m["epoch"] for m in metrics(tmp_path / "g" / f"student{k}")] == [1, 2]


def test_a_student_with_a_non_finite_loss_stops_and_the_others_go_on(demo_root, teacher_ckpt, tmp_path, monkeypatch,
                                                                        capsys):
    forward = Student.forward_losses

    def nan_for_student2(self, *a, **k):
        losses, s_w = forward(self, *a, **k)
        if self.run_dir.endswith("student2") and self.step == 5:
            losses["loss"] = losses["loss"] * float("nan")
        return losses, s_w
    monkeypatch.setattr(Student, "forward_losses", nan_for_student2)
    argv = group_args(demo_root, teacher_ckpt, tmp_path, "run.log_every=1")
    assert run_main(lambda: train.main(argv)) == 2
    assert "student(s) 2 of 4 stopped" in capsys.readouterr().err
    doc = json.load(open(tmp_path / "g" / "group.json"))
    failed = doc["students"][2]["summary"]["failed"]
    assert "non-finite loss at step 5 (epoch 2)" in failed
    assert failed == json.load(open(tmp_path / "g" / "student2" / "summary.json"))["failed"]
    for k in (0, 1, 3):
        assert doc["students"][k]["summary"]["epochs"] == 2 and "failed" not in doc["students"][k]["summary"]


def test_a_students_random_stream_is_its_own(demo_cfg):
    """Draws inside a student's step (dropout) come from its stream, whatever the shared stream did between."""
    def draws(outer_draws):
        st = Student(demo_cfg(), torch.device("cpu"), "unused", 4, lambda: torch.autocast("cpu", enabled=False), False)
        out = []
        for n in outer_draws:
            torch.rand(n)  # the shared stream moves (a DataLoader's base seed, another student)
            with st.own_rng():
                out.append(torch.rand(3))
        return torch.stack(out)
    torch.manual_seed(123)
    a = draws([0, 0, 0])
    torch.manual_seed(456)
    b = draws([5, 1, 7])
    assert torch.equal(a, b)


def test_report_draws_every_student_of_a_group_in_one_figure_and_table(group_run, tmp_path):
    import report
    run_dir, _ = group_run
    report.main([str(run_dir), "--out", str(tmp_path / "rep")])
    rows = [ln for ln in open(tmp_path / "rep" / "summary.md") if ln.startswith("| student")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| student0", "| student1 (model.name=resnet14)", "| student2 (method.name=kd)",
        "| student3 (model.init_seed=7, method.name=ce, optim.lr=0.02)"]
    assert os.path.getsize(tmp_path / "rep" / "curves.png") > 0


class _SavedBytes:
    """Bytes of tensors autograd holds for backward, now and at peak (each packed tensor counted by its size)."""
    def __init__(self):
        self.now = self.peak = 0

    def pack(self, t):
        return _Held(self, t)

    @staticmethod
    def unpack(held):
        return held.t


class _Held:
    def __init__(self, meter, t):
        self.meter, self.t, self.n = meter, t, t.numel() * t.element_size()
        meter.now += self.n
        meter.peak = max(meter.peak, meter.now)

    def __del__(self):
        self.meter.now -= self.n


def test_only_one_students_activations_are_alive_at_a_time(demo_root, teacher_ckpt, tmp_path):
    """The peak of what autograd saves for backward in a group equals that of its largest student's solo run, not
    the students' sum: each student's graph is freed before the next student's forward."""
    students = ["model.name=resnet14", "method.name=kd"]

    def peak(name, *extra):
        meter = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            train.main(base_args(demo_root, teacher_ckpt, tmp_path, f"run.name={name}", "data.subset=64",
                                 "optim.epochs=1", *extra))
        assert meter.now == 0
        return meter.peak
    solo = [peak("s0")] + [peak(f"s{k + 1}", *s.split()) for k, s in enumerate(students)]
    group = peak("g", *[a for s in students for a in ("--student", s)])
    assert group == max(solo) and group < sum(solo) - min(solo), (group, solo)
