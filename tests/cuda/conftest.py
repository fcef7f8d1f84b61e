"""The CUDA checks of an install: the accelerator route against the CPU's, on one GPU.

    pytest -m cuda                                   # on a GPU machine (skipped without CUDA)
    CRLD_CUDA_CHECKS_ON=cpu pytest -m cuda           # every check's code path on the CPU at tiny sizes
    CRLD_CHECKS_REPORT=out.json pytest -m cuda       # also a JSON record per check, rewritten after each

A test marked `cuda` takes the `device` fixture; its comparison is a plain function of this folder that a
CPU test beside it feeds a wrong "device" result, so that each check is known to fail when it should.
"""
import json
import os

import pytest
import torch

ON = os.environ.get("CRLD_CUDA_CHECKS_ON", "")
REPORT = os.environ.get("CRLD_CHECKS_REPORT", "")
_records = []


def pytest_collection_modifyitems(config, items):
    if ON == "cpu" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (CRLD_CUDA_CHECKS_ON=cpu runs the checks on the CPU)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    return torch.device("cpu" if ON == "cpu" else "cuda:0")


@pytest.fixture(scope="session")
def small(device):
    """Tiny sizes on the CPU: a dry run proves code paths, not numbers."""
    return device.type == "cpu"


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cuda_checks"))


@pytest.fixture(autouse=True)
def _release_device_memory(request):
    yield
    if request.node.get_closest_marker("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _device_name():
    return "cpu (dry run)" if ON == "cpu" else torch.cuda.get_device_name(0)


def pytest_runtest_logreport(report):
    """One record per check (outcome, seconds, the `summary` it recorded, the error's last line), the file
    rewritten after each, so a window's stage killed at its time limit keeps what it got."""
    if not REPORT or (report.when != "call" and not report.failed):
        return
    props = dict(report.user_properties)
    error = str(report.longrepr).strip().splitlines()[-1][:300] if report.failed else None
    _records.append({"name": report.nodeid.split("::")[-1], "outcome": report.outcome, "when": report.when,
                     "seconds": round(report.duration, 2), "summary": props.get("summary", ""), "error": error,
                     "details": props.get("details")})
    tmp = REPORT + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"device": _device_name(), "checks": _records}, f, indent=1, default=str)
    os.replace(tmp, REPORT)
