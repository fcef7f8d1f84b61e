import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    from datasets_prep.make_demo import make_demo
    return make_demo(str(tmp_path_factory.mktemp("data") / "demo"))
