"""The paper's comparison rows as group runs (configs/<dataset>/study/<pair>.yaml): every pair has one, each trains
the row's nine methods with the released settings, every student starts, and one study trains end to end."""
import glob
import json
import math
import os

import pytest
import torch

import train
from training.config import load_config, load_group
from training.losses import method_loss
from training.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "crld", "*.yaml")))
STUDIES = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "study", "*.yaml")))
# (method.name, CRLD's pairwise term, logit standardisation); student 0 is CRLD itself
ROW = {("ce", None, False), ("kd", None, False), ("dkd", None, False), ("nkd", None, False), ("normkd", None, False),
       ("mlkd", None, False), ("crld", "kd", False), ("crld", "dkd", False), ("crld", "kd", True)}
SHARED = ("data", "pipeline", "teacher")
BUILT = set()


def short(path):
    return os.path.relpath(path, ROOT)


def row_of(cfg):
    m = cfg.method
    return m.name, m.base if m.name == "crld" else None, m.logit_stand


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every tensor here is tiny: one thread spares the pool's hand-offs, which cost more than the work on a
    machine that runs the suite's two processes on two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def groups():
    return {short(p): load_group(p) for p in STUDIES}


def test_every_pair_has_a_study_of_the_same_name():
    assert [p.replace(os.sep + "crld" + os.sep, os.sep + "study" + os.sep) for p in PAIRS] == STUDIES


@pytest.mark.parametrize("path", [short(p) for p in STUDIES])
def test_a_study_is_the_pairs_crld_config_and_the_rows_nine_methods(groups, path):
    group = groups[path]
    assert [row_of(c) for c in group][0] == ("crld", "kd", False)
    assert len(group) == 9 and {row_of(c) for c in group} == ROW
    # student 0 is the pair's own config, and the group shares its data, teacher and schedule length
    pair = load_config(os.path.join(ROOT, path.replace("study", "crld")))
    for section in ("data", "pipeline", "model", "teacher", "method", "optim"):
        assert group[0][section] == pair[section], section
    for c in group[1:]:
        assert all(c[s] == group[0][s] for s in SHARED) and c.optim.epochs == group[0].optim.epochs
        assert c.model == group[0].model and c.optim.milestones == group[0].optim.milestones


def test_released_settings_that_differ_by_pair_and_dataset(groups):
    """Spot checks against the released files named in each study's header."""
    def student(path, name, base=None, stand=False):
        return next(c for c in groups[path] if row_of(c) == (name, base, stand))
    dkd = {p: student(p, "dkd").method.dkd_beta for p in groups}
    assert dkd["configs/cifar100/study/res56_res20.yaml"] == 2.0 and dkd["configs/cifar100/study/vgg13_vgg8.yaml"] == 6.0
    assert dkd["configs/imagenet/study/r34_r18.yaml"] == 0.5 and dkd["configs/imagenet/study/r50_mv1.yaml"] == 2.0
    for p in groups:
        over = student(p, "crld", "dkd").method
        assert (over.dkd_beta, over.dkd_warmup) == (dkd[p], student(p, "dkd").method.dkd_warmup)
    imagenet = "configs/imagenet/study/r34_r18.yaml"
    kd = student(imagenet, "kd").method
    assert (kd.temperature, kd.ce_weight, kd.kd_weight) == (1.0, 0.5, 0.5)
    assert student(imagenet, "dkd").method.dkd_warmup == 1 and student(imagenet, "ce").method.ce_weight == 1.0
    assert student(imagenet, "mlkd").optim.lr == 0.1 and student(imagenet, "kd").optim.lr == 0.2
    cifar = "configs/cifar100/study/res32x4_res8x4.yaml"
    kd = student(cifar, "kd").method
    assert (kd.temperature, kd.ce_weight, kd.kd_weight, student(cifar, "dkd").method.dkd_warmup) == (4.0, 0.1, 0.9, 20)
    assert student("configs/tiny_imagenet/study/res32x4_res8x4.yaml", "normkd").method.normkd_t_norm == 1.0
    assert all(c.optim.lr == 0.01 for c in groups["configs/cifar100/study/res50_mv2.yaml"])


@pytest.mark.parametrize("path", [short(p) for p in STUDIES])
def test_every_student_of_a_study_starts(groups, path):
    """Its model builds and gives logits of the dataset's classes (the architectures pool adaptively, so 32 px
    stands in for 224 / 384), the teacher architecture builds (on the meta device: no memory for ViT-L), and its
    loss on random logits of both views is finite and reaches the student's logits."""
    group = groups[path]
    cfg0 = group[0]
    n = cfg0.data.num_classes
    if (cfg0.teacher.name, n) not in BUILT:  # pairs share architectures: each is built once
        with torch.device("meta"):
            assert create_model(cfg0.teacher.name, n) is not None
        BUILT.add((cfg0.teacher.name, n))
    if (cfg0.model.name, n) not in BUILT:
        torch.manual_seed(0)
        with torch.no_grad():
            assert create_model(cfg0.model.name, n).eval()(torch.randn(1, 3, 32, 32)).shape == (1, n)
        BUILT.add((cfg0.model.name, n))
    t_w, t_s = torch.randn(8, n) * 3, torch.randn(8, n) * 3
    target = torch.randint(0, n, (8,))
    for cfg in group:
        s_w, s_s = (torch.randn(8, n, requires_grad=True) for _ in range(2))
        out = method_loss(cfg.method, s_w, s_s, t_w, t_s, target, epoch=1)
        assert math.isfinite(out["loss"].item()), row_of(cfg)
        out["loss"].backward()
        assert s_w.grad is not None and s_w.grad.abs().sum() > 0, row_of(cfg)


def test_a_cifar_study_trains_its_nine_students_in_one_run(demo_cut, random_teacher, tmp_path):
    """configs/cifar100/study/res56_res20.yaml (the cheapest pair) on 64 demo images for one epoch."""
    study = os.path.join(ROOT, "configs/cifar100/study/res56_res20.yaml")
    teacher = random_teacher("resnet56", 10)
    summaries = train.main(["--config", study, "data.dataset=demo", f"data.root={demo_cut(64, 32)}",
                            "data.num_classes=10", "pipeline.batch_size=16", "pipeline.val_batch_size=32",
                            "pipeline.num_workers=0", "optim.epochs=1", "run.progress=false",
                            f"run.out_dir={tmp_path}", f"teacher.ckpt={teacher}"])
    run_dir = tmp_path / "res56_res20"
    assert len(summaries) == 9 and sorted(os.listdir(run_dir)) == ["group.json"] + [f"student{k}" for k in range(9)]
    for k, s in enumerate(summaries):
        on_disk = json.load(open(run_dir / f"student{k}" / "summary.json"))
        assert on_disk["epochs"] == 1 and "failed" not in on_disk and math.isfinite(on_disk["best_top1"]), k
    rows = [row_of(load_config(str(run_dir / f"student{k}" / "config.yaml"))) for k in range(9)]
    assert set(rows) == ROW
