"""Input that cannot be right is refused in one line, with exit code 2 and nothing written: a resume under
another config, an empty class folder, a file that is not a checkpoint. (Thread counts above the CPU budget are
lowered, not refused: tests/test_cpu_budget.py.)"""
import hashlib
import os

import pytest
import torch

import train
from datasets_prep import prep_ffcv
from training.checkpoint import CheckpointError, safe_load
from training.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(demo_root, out, *extra):
    return ["--config", os.path.join(ROOT, "configs/demo/ce.yaml"), f"data.root={demo_root}", f"run.out_dir={out}",
            "run.name=r", "data.subset=64", "pipeline.batch_size=32", "pipeline.num_workers=0", "optim.epochs=1",
            "optim.warmup_epochs=0", "run.progress=false", *extra]


def one_error_line(capsys, argv):
    rc = run_main(lambda: train.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def one_epoch(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    train.main(args(demo_root, out))
    return out


@pytest.mark.parametrize("change, key", [("model.name=resnet14", "model.name"), ("data.subset=96", "data.subset"),
                                         ("method.name=kd", "method.name"), ("optim.lr=0.2", "optim.lr")])
def test_resume_under_another_config_is_refused_naming_the_key(demo_root, one_epoch, capsys, change, key):
    before = digest(one_epoch / "r")
    msg = one_error_line(capsys, args(demo_root, one_epoch, change, "--resume"))
    assert f"--resume under another config: {key} (" in msg and "Traceback" not in msg
    assert digest(one_epoch / "r") == before


def test_resume_may_extend_the_run_and_change_logging_and_workers(demo_root, one_epoch, tmp_path):
    import shutil
    shutil.copytree(one_epoch / "r", tmp_path / "r")
    s = train.main(args(demo_root, tmp_path, "optim.epochs=2", "run.log_every=3", "pipeline.num_workers=1",
                        "--resume"))
    assert s["epochs"] == 2


def test_an_empty_class_folder_is_refused_unless_allowed(jpeg_folder, tmp_path, capsys):
    root = jpeg_folder(str(tmp_path / "f"), classes=("cat", "dog", "emu"))
    for f in os.listdir(os.path.join(root, "train", "emu")):
        os.remove(os.path.join(root, "train", "emu", f))
    common = ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=3", "method.name=ce",
              "model.name=resnet8", "pipeline.batch_size=2", "pipeline.num_workers=0", f"run.out_dir={tmp_path / 'o'}",
              "optim.epochs=1", "run.progress=false", "data.image_size=16"]
    msg = one_error_line(capsys, common)
    assert "1 class folder(s) hold no images: emu" in msg and "data.allow_empty_classes=true" in msg
    assert not os.path.exists(tmp_path / "o")
    assert train.main(common + ["data.allow_empty_classes=true"])["epochs"] == 1
    out = tmp_path / "train.beton"
    assert run_main(lambda: prep_ffcv.main(["--format", "imagefolder", "--src", root, "--out", str(out)])) == 2
    assert "hold no images: emu" in capsys.readouterr().err
    assert not any(f.startswith("train.beton") for f in os.listdir(tmp_path))


def test_a_file_that_is_not_a_checkpoint_is_one_short_line(tmp_path, demo_root, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not weights\n")
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"notes.pt: not a PyTorch checkpoint \(neither"):
        safe_load(str(text))
    with pytest.raises(CheckpointError, match=r"cut.pt: truncated or corrupt checkpoint"):
        safe_load(str(cut))
    assert safe_load(str(good))["model"]["w"].shape == (3,)
    msg = one_error_line(capsys, args(demo_root, tmp_path, "method.name=kd", f"teacher.ckpt={text}"))
    # short beside the path it names (a deep temporary folder makes the path alone 100+ characters)
    assert str(text) in msg and len(msg.replace(str(text), "")) < 80, msg
    assert "weights_only" not in msg and not (tmp_path / "r").exists()
