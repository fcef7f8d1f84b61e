import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    from datasets_prep.make_demo import make_demo
    return make_demo(str(tmp_path_factory.mktemp("data") / "demo"))
