"""Where the paper configs follow the released code's data loading (docs/design.md, "Against the released
code"): its loaders keep the last partial training batch."""
import glob
import os

import pytest

from training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = [sorted(glob.glob(os.path.join(ROOT, "configs", d, "**", "*.yaml"), recursive=True))
         for d in ("cifar100", "tiny_imagenet", "imagenet")]


@pytest.mark.parametrize("folder", PAPER, ids=lambda files: os.path.basename(os.path.dirname(files[0])))
def test_paper_configs_keep_the_last_partial_batch(folder):
    for path in folder:
        assert load_config(path).pipeline.drop_last is False, path
