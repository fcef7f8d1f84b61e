"""The optional backends' tests skip when DALI or FFCV cannot be imported; this makes sure that only
happens where they cannot be installed, not because `make setup` failed to build them."""
import platform
import shutil
import subprocess

import pytest


def test_dali_imports_where_its_wheel_exists():
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("nvidia-dali-cuda130 ships Linux x86_64 wheels only")
    import nvidia.dali  # noqa: F401 - in requirements.txt: a failure here is a broken environment


def test_ffcv_imports_where_its_build_dependencies_exist():
    have_deps = shutil.which("pkg-config") and subprocess.run(
        ["pkg-config", "--exists", "libturbojpeg", "opencv4"]).returncode == 0
    if not have_deps:
        pytest.skip("libturbojpeg / opencv4 not found by pkg-config: FFCV cannot be built here")
    import ffcv  # noqa: F401 - scripts/setup_env.sh builds it whenever these libraries exist
