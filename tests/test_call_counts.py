"""The accelerator route's Python work per batch does not grow with the batch.

On a GPU the data path's host cost is Python in the training process, competing with the step's kernel
launches; what predicts it is how that work scales with the batch size. With `pipeline.route=device`
(the accelerator route's code, run on the CPU here) the number of Python function calls the process makes
(all its threads) during one `next(loader)` at batch 128 is at most 1.3x the number at batch 32, and at
most 3,000, for `dali` and `ffcv` on JPEG folders and for the array route (`gpu`).
"""
import functools
import importlib
import os

import pytest

from bench.call_count import calls_per_batch_each
from bench.loader import loader_iter
from datasets_prep.make_jpeg_folder import make_jpeg_folder
from datasets_prep.prep_ffcv import main as prep

SIZES = (32, 128)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """6 batches of 128 small JPEGs (and their .beton files): the counted batches are mid-epoch at both
    sizes, with DALI's prefetch still asking its feeder for more."""
    root = make_jpeg_folder(str(tmp_path_factory.mktemp("cc") / "j"), train=6 * 128, val=8, classes=4, size=(40, 32))
    for split in ("train", "val"):
        prep(["--format", "imagefolder", "--src", root, "--split", split, "--out",
              os.path.join(root, "ffcv", f"{split}.beton"), "--num-workers", "1", "--write-mode", "jpg"])
    return root


def make_iter(over, route="device"):
    return functools.partial(loader_iter, (*over, f"pipeline.route={route}", "pipeline.num_workers=1",
                                           "method.name=crld"), "cpu")


def jpeg_over(root, pipeline):
    return ["data.dataset=imagefolder", f"data.root={root}", "data.num_classes=4", "data.image_size=24",
            "data.train_crop=rrc", "data.val_resize=28", f"pipeline.name={pipeline}"]


def importable(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def counts(request, demo_root):
    """{configuration: [calls per batch at each of SIZES]} for every configuration whose backend imports, all
    counted in one spawned process (its start-up paid once; `calls_per_batch_each` keeps the counts apart).
    FFCV's comes last: its loader's thread keeps waking after the count."""
    def jpegs(pipeline, route="device"):
        return make_iter(jpeg_over(request.getfixturevalue("jpegs"), pipeline), route)

    configs = {"dali_host": ("nvidia.dali", lambda: jpegs("dali", route="host")),
               "dali": ("nvidia.dali", lambda: jpegs("dali")),
               "gpu": ("torch", lambda: make_iter(["data.dataset=demo", f"data.root={demo_root}",
                                                   "data.num_classes=10", "pipeline.name=gpu"])),
               "ffcv": ("ffcv", lambda: jpegs("ffcv"))}
    configs = {k: make() for k, (module, make) in configs.items() if importable(module)}
    return dict(zip(configs, calls_per_batch_each(list(configs.values()), SIZES)))


def assert_bounded(small, large):
    print(f"Python calls per batch at batch {SIZES[0]}: {small:.0f}, at {SIZES[1]}: {large:.0f}")
    assert large <= 1.3 * small and large <= 3000, (small, large)


@pytest.mark.parametrize("pipeline", ["dali", "ffcv"])
def test_jpeg_folders_cost_a_bounded_number_of_calls_per_batch(counts, pipeline):
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[pipeline])
    assert_bounded(*counts[pipeline])


def test_the_array_route_costs_a_bounded_number_of_calls_per_batch(counts):
    assert_bounded(*counts["gpu"])


def test_the_host_route_grows_with_the_batch(counts):
    """The counter sees per-sample work: the host route cuts and augments each sample in Python."""
    pytest.importorskip("nvidia.dali")
    small, large = counts["dali_host"]
    assert large > 2 * small
