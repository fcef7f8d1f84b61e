"""Every ImageNet config trains through every backend on this machine (whatever its core count): a tiny
ImageFolder, random teachers of the configs' architectures, everything else as the config says (workers
included); only the sizes that would take hours on a CPU are overridden."""
import glob
import os

import pytest
import torch
import yaml

import train
from datasets_prep import prep_ffcv
from pipelines import available_pipelines
from test_train import right_of
from training.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs/imagenet/crld/*.yaml")))


@pytest.fixture(scope="module")
def folder(jpeg_folder, tmp_path_factory):
    root = jpeg_folder(str(tmp_path_factory.mktemp("imagenet") / "in"), per_class=4)
    if "ffcv" in available_pipelines():
        for split in ("train", "val"):
            prep_ffcv.main(["--format", "imagefolder", "--src", root, "--split", split, "--out",
                            os.path.join(root, "ffcv", f"{split}.beton"), "--num-workers", "1"])
    return root


def test_the_imagenet_configs_are_found():
    assert [os.path.basename(c) for c in CONFIGS] == ["r34_r18.yaml", "r50_mv1.yaml"]


# every backend that reads image folders (`gpu` holds array datasets, CIFAR and the demo, on the device)
@pytest.mark.parametrize("pipeline", [p for p in ("torch", "dali", "ffcv") if p in available_pipelines()])
@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_an_imagenet_config_trains_through_a_backend(folder, tmp_path, config, pipeline):
    teacher = yaml.safe_load(open(config))["teacher"]["name"]
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": create_model(teacher, 2).state_dict()}, ckpt)
    s = train.main(["--config", config, "--pipeline", pipeline, f"data.root={folder}", "data.num_classes=2",
                    "data.image_size=32", "data.val_resize=36", "pipeline.batch_size=4", "pipeline.val_batch_size=4",
                    "optim.epochs=1", f"teacher.ckpt={ckpt}", f"run.out_dir={tmp_path}", "run.progress=false"])
    assert s["epochs"] == 1 and right_of(s["best_top1"], 8)
