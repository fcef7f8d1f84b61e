"""Fixtures shared by the test files: the demo data, a config builder over it, a random teacher checkpoint, a
tiny JPEG ImageFolder and the first batches of a loader. Everything runs on the CPU."""
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from datasets_prep.make_demo import make_demo
from datasets_prep.prep_ffcv import main as prep_ffcv
from pipelines import build_loaders
from training.config import load_config
from training.losses import views_needed
from training.models import create_model

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return make_demo(str(tmp_path_factory.mktemp("data") / "demo"))


def _to_betons(src, folder):
    """Both splits of the demo-format set in `src` converted for FFCV into `folder` (train.beton, val.beton and
    their sidecars)."""
    for split, name in (("train", "train"), ("test", "val")):
        prep_ffcv(["--format", "demo", "--src", src, "--split", split, "--out", f"{folder}/{name}.beton",
                   "--num-workers", "1"])
    return folder


@pytest.fixture(scope="session")
def demo_betons(demo_root, tmp_path_factory):
    """The demo set converted for FFCV: a folder holding train.beton and val.beton with their sidecars."""
    return _to_betons(demo_root, str(tmp_path_factory.mktemp("ffcv")))


@pytest.fixture(scope="session")
def demo_cut(demo_root, tmp_path_factory):
    """demo_cut(n_train, n_val, betons=False) -> a data.root holding the demo set's first n_train training and
    n_val validation images (meta.json unchanged), made once per size; with betons, both splits are also
    converted for FFCV into root/ffcv/ (once). For tests that walk whole epochs: the full set is 1437 / 360."""
    made = {}

    def make(n_train, n_val, betons=False):
        if (n_train, n_val) not in made:
            root = tmp_path_factory.mktemp("demo_cut") / "demo"
            root.mkdir()
            for split, n in (("train", n_train), ("test", n_val)):
                with np.load(os.path.join(demo_root, f"{split}.npz")) as z:
                    assert n <= len(z["labels"]), (split, n)
                    np.savez(root / f"{split}.npz", images=z["images"][:n], labels=z["labels"][:n])
            shutil.copy(os.path.join(demo_root, "meta.json"), root / "meta.json")
            made[n_train, n_val] = str(root)
        root = made[n_train, n_val]
        if betons and not os.path.isdir(os.path.join(root, "ffcv")):
            _to_betons(root, os.path.join(root, "ffcv"))
        return root
    return make


@pytest.fixture(scope="session")
def demo_cfg(demo_root):
    """demo_cfg(*overrides, pipeline="torch"): the demo set, a 96-image training subset, batches of 16, no
    loader workers."""
    def build(*over, pipeline="torch"):
        return load_config(None, ["data.dataset=demo", f"data.root={demo_root}", "data.num_classes=10",
                                  "data.subset=96", "pipeline.batch_size=16", "pipeline.num_workers=0",
                                  f"pipeline.name={pipeline}", *over])
    return build


@pytest.fixture(scope="session")
def first_batches():
    """first_batches(cfg, n=None, epoch=0, rank=0, world=1, with_train=False) -> (the first n training batches of
    `epoch`, all of them when n is None; the validation loader; with_train: the training loader after them),
    built on the CPU."""
    def take(cfg, n=None, epoch=0, rank=0, world=1, with_train=False):
        train, val, _ = build_loaders(cfg, torch.device("cpu"), rank, world, views_needed(cfg.method.name))
        train.set_epoch(epoch)
        got = list(itertools.islice(train, n))
        return (got, val, train) if with_train else (got, val)
    return take


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    """random_teacher(name="resnet8", num_classes=10, seed=0) -> the path of a randomly initialised model saved
    in the CRD / mdistiller zoo's format ({"model": state_dict}), made once per argument set."""
    made = {}

    def make(name="resnet8", num_classes=10, seed=0):
        if (name, num_classes, seed) not in made:
            torch.manual_seed(seed)
            path = tmp_path_factory.mktemp("teacher") / "ckpt_epoch_240.pth"
            torch.save({"model": create_model(name, num_classes).state_dict()}, path)
            made[name, num_classes, seed] = str(path)
        return made[name, num_classes, seed]
    return make


@pytest.fixture(scope="session")
def teacher_ckpt(random_teacher):
    """A random resnet8 teacher for the demo's 10 classes."""
    return random_teacher()


@pytest.fixture
def one_epoch_crld(demo_root, teacher_ckpt, tmp_path):
    """one_epoch_crld(pipeline, *overrides) -> train.py's summary of one CRLD epoch on 128 demo images through
    `pipeline`, run in tmp_path/<pipeline>; the loss stays finite and the run records the pipeline."""
    def run(pipeline, *over):
        s = train.main(["--config", os.path.join(ROOT, "configs/demo/crld.yaml"), "--pipeline", pipeline,
                        f"data.root={demo_root}", f"run.out_dir={tmp_path}", f"run.name={pipeline}",
                        "data.subset=128", "pipeline.batch_size=32", "optim.epochs=1", "optim.warmup_epochs=0",
                        "run.progress=false", "model.name=resnet8", "teacher.name=resnet8",
                        f"teacher.ckpt={teacher_ckpt}", *over])
        assert s["epochs"] == 1 and np.isfinite(s["best_top1"])
        assert f"name: {pipeline}" in open(tmp_path / pipeline / "config.yaml").read()
        return s
    return run


@pytest.fixture(scope="session")
def jpeg_folder():
    """jpeg_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 48)) -> root, an ImageFolder (train/ and
    val/) of random-pixel JPEGs."""
    def make(root, classes=("cat", "dog"), per_class=3, size=(40, 48)):
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for c in classes:
                os.makedirs(os.path.join(root, split, c), exist_ok=True)
                for k in range(per_class):
                    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                    Image.fromarray(arr).save(os.path.join(root, split, c, f"{k}.jpg"), quality=90)
        return root
    return make


@pytest.fixture(scope="session")
def script_module():
    """script_module(name) -> scripts/<name>.py loaded as a module (scripts/ holds programs, not a package)."""
    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="session")
def gpu_dry_run():
    """gpu_dry_run(out, work, stages) -> the CompletedProcess of `gpu_window/run.sh OUT --cpu-dry-run` for those
    STAGES. NO_LIMITS: no stage budget or time limit, so that a slow or loaded machine cannot fail a stage; the
    subprocess timeout only guards against a hang."""
    def run(out, work, stages):
        env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable,
               "NO_LIMITS": "1", "WORK": str(work), "STAGES": stages}
        return subprocess.run(["bash", "gpu_window/run.sh", str(out), "--cpu-dry-run"], cwd=ROOT,
                              capture_output=True, text=True, timeout=3600, env=env, check=False)
    return run
