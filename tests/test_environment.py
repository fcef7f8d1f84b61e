"""The environment `scripts/setup_env.sh` builds: DALI and FFCV deliver a batch wherever they can be installed, so
their tests skip only where the libraries cannot exist, never because the set-up broke; and the project is
installed, so its packages import from any folder."""
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from training.config import load_config


def _one_batch(cfg, first_batches):
    (batch,), val = first_batches(cfg, 1)
    assert batch.weak.shape == batch.strong.shape == (cfg.pipeline.batch_size, 3, 32, 32)
    assert torch.isfinite(batch.weak).all() and torch.isfinite(batch.strong).all()
    assert next(iter(val)).image.shape[1:] == (3, 32, 32)


def test_dali_delivers_a_batch_where_its_wheel_exists(demo_cfg, first_batches):
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("nvidia-dali-cuda130 ships Linux x86_64 wheels only")
    # in requirements.txt: `pipeline.name=dali` is refused when DALI does not import
    _one_batch(demo_cfg(pipeline="dali"), first_batches)


def test_ffcv_delivers_a_batch_where_its_build_dependencies_exist(demo_root, first_batches, request):
    have_deps = shutil.which("pkg-config") and subprocess.run(
        ["pkg-config", "--exists", "libturbojpeg", "opencv4"]).returncode == 0
    if not have_deps:
        pytest.skip("libturbojpeg / opencv4 not found by pkg-config: FFCV cannot be built here")
    # scripts/setup_env.sh builds FFCV whenever these libraries exist
    betons = request.getfixturevalue("demo_betons")
    cfg = load_config(None, ["data.dataset=demo", f"data.root={demo_root}", "data.num_classes=10",
                             f"pipeline.ffcv_dir={betons}", "pipeline.batch_size=16", "pipeline.num_workers=1",
                             "pipeline.name=ffcv"])
    _one_batch(cfg, first_batches)


def test_the_project_imports_from_any_folder(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import pipelines, training, datasets_prep, train, bench; "
                        "print(training.__file__)"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    assert os.path.dirname(os.path.dirname(r.stdout.strip())) == os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))
