"""The GPU window's tools on the CPU: gpu_window/run.sh's dry run (every stage's code path but DALI's, the summary), and
gpu_window/kit.py's pack -> size check -> unpack round trip on stand-in wheels."""
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

from gpu_window import kit as gpu_kit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The dali stages run in their own call (tests/test_gpu_window_dali.py), as in the window.
STAGES = ["preflight", "correctness", "cifar_data", "cifar_step", "cifar_e2e", "jpeg_data", "r34_step", "r34_e2e_torch",
          "strong", "group"]
CORRECTNESS = {"test_crld_steps_under_autocast_channels_last[bf16]", "test_crld_steps_under_autocast_channels_last[fp16]",
               "test_augmenter_on_device_matches_cpu", "test_graph_program_on_device_matches_cpu",
               "test_gpu_route_on_device_matches_cpu", "test_prefetcher_hands_over_every_batch_intact",
               "test_one_crld_epoch[torch]", "test_one_crld_epoch[gpu]"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, gpu_dry_run):
    out, work = tmp_path_factory.mktemp("gpu_run"), tmp_path_factory.mktemp("gpu_run_work")
    return out, gpu_dry_run(out, work, "preflight correctness cifar r34 strong group")


def test_dry_run_every_stage_passes(dry_run):
    out, r = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [ln.split("\t") for ln in (out / "stages.tsv").read_text().splitlines()[1:]]
    assert sorted(r[0] for r in rows) == sorted(STAGES), rows
    assert all(r[1] == "ok" for r in rows), rows


def test_dry_run_records_checks_and_rates(dry_run):
    out, _ = dry_run
    pre = json.loads((out / "preflight" / "preflight.json").read_text())
    assert pre["env"]["project"]["importable"], pre["env"]["project"]
    for name in ("dali", "ffcv", "apex"):
        assert isinstance(pre["env"][name]["importable"], bool)
    assert pre["matmul_bf16"]["tflops"] > 0 and pre["env"]["dry_run"] is True
    doc = json.loads((out / "correctness.json").read_text())
    checks = {c["name"]: c["outcome"] for c in doc["checks"]}
    assert set(checks) == CORRECTNESS and set(checks.values()) == {"passed"}, checks
    step = json.loads((out / "cifar_step.json").read_text())
    e2e = json.loads((out / "cifar_e2e.json").read_text())
    assert [r["teacher_source"] for r in step] == ["online", "online", "cache"]
    assert [(r["pipeline"], r["teacher_source"]) for r in e2e] == [("torch", "online"), ("gpu", "online"),
                                                                  ("gpu", "cache")]
    assert all(r["samples_per_s"] > 0 for r in step + e2e)
    summary = (out / "summary.md").read_text()
    for s in ("## Stages", "## Correctness checks", "## resnet32x4 -> resnet8x4 at 32", "## ResNet34 -> ResNet18",
              "## Strong-view programs", "| e2e | gpu/cache/amp=off/cl |", "## Several students, one data pass"):
        assert s in summary, s


def test_cuda_checks_are_collected_and_skipped_without_cuda():
    """`pytest -m cuda` on a CPU: every check of tests/cuda/ collected, each skipped with its reason, none run."""
    env = {k: v for k, v in os.environ.items() if k != "CRLD_CUDA_CHECKS_ON"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs",
                        "tests/cuda"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout[-2000:]
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", r.stdout))
    assert counts.get("skipped", 0) >= 10 and "passed" not in counts and "failed" not in counts, r.stdout[-2000:]
    assert counts.get("deselected", 0) >= 5 and "no CUDA device" in r.stdout, r.stdout[-2000:]


def test_usage(tmp_path):
    r = subprocess.run(["bash", "gpu_window/run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(["bash", "gpu_window/run.sh", str(tmp_path), "--bogus"], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "--bogus" in r.stderr


def _wheel(folder, name, version, files):
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for arc, data in files.items():
            z.writestr(arc, data)
    return path


def _stand_in_wheels(tmp_path):
    dl = tmp_path / "kit" / "downloads"
    dl.mkdir(parents=True)
    big = os.urandom(300_000)  # incompressible, so the pack needs several parts at the test's part size
    _wheel(dl, "omegaconf", "2.3.0", {"omegaconf/__init__.py": "X = 1\n"})
    _wheel(dl, "timm", "1.0.31", {"timm/__init__.py": "__version__ = '1.0.31'\n",
                                  "timm-1.0.31.dist-info/METADATA": "Name: timm\n"})
    _wheel(dl, "nvidia_dali_cuda130", "2.4.0", {
        "nvidia/dali/__init__.py": "__version__ = '2.4.0'\n", "nvidia/dali/libdali.so": big,
        "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so": b"312",
        "nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so": b"311",
        "nvidia_dali_cuda130-2.4.0.data/scripts/tool": b"#!/bin/sh\n"})
    return str(tmp_path / "kit")


def test_kit_round_trip_and_size_check(tmp_path):
    """Parts within the limit, checksummed; unpacked there only once every part has travelled, byte for byte;
    other CPython versions' modules dropped; a part over the call limit named."""
    kit = _stand_in_wheels(tmp_path)
    m = gpu_kit.build(kit, part_mib=0.1, base_reqs=["omegaconf==2.3.0"], dali_reqs=["nvidia-dali-cuda130==2.4.0"],
                      packed_reqs=["timm==1.0.31"])
    parts = [p["file"] for p in m["parts"]]
    assert sorted(os.listdir(os.path.join(kit, "base"))) == ["MANIFEST.json", "MANIFEST.md", "SHA256SUMS",
                                                             "omegaconf-2.3.0-py3-none-any.whl", "packed-site.tar.xz"]
    assert len(parts) >= 3 and all(p["bytes"] <= 0.1 * 2 ** 20 for p in m["parts"]), m
    sizes = gpu_kit.check(kit, limit_mib=1, tree=0)
    assert sizes["largest_call_mib"] <= 1
    with pytest.raises(gpu_kit.KitError, match=parts[0]):
        gpu_kit.check(kit, limit_mib=0.05, tree=0)

    # there: the parts arrive one call at a time; a call carries base/ and one part in kit/parts
    there, dest = tmp_path / "there", tmp_path / "dest"
    os.makedirs(there / "parts")
    subprocess.run(["cp", "-r", os.path.join(kit, "base"), str(there / "base")], check=True)
    for k, name in enumerate(parts):
        for old in os.listdir(there / "parts"):
            os.remove(there / "parts" / old)
        subprocess.run(["cp", os.path.join(kit, "parts", name), str(there / "parts")], check=True)
        r = gpu_kit.unpack(str(there), str(dest))
        assert (r["dali"] is None) == (k < len(parts) - 1), r
    dali = dest / "dali"
    with zipfile.ZipFile(os.path.join(kit, "downloads", "nvidia_dali_cuda130-2.4.0-py3-none-any.whl")) as z:
        assert (dali / "nvidia/dali/libdali.so").read_bytes() == z.read("nvidia/dali/libdali.so")
    assert (dali / "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so").exists()
    assert not (dali / "nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so").exists()
    assert not list(dali.glob("*.data")) and (dali / "sitecustomize.py").exists()
    assert (dest / "site" / "omegaconf" / "__init__.py").exists()
    assert (dest / "site" / "timm" / "__init__.py").exists() and (dest / "site" / "timm-1.0.31.dist-info").is_dir()
    assert not (dest / "site" / "sitecustomize.py").exists()
    assert r["pythonpath"] == f"{dest / 'site'}{os.pathsep}{dali}"

    # the sitecustomize joins the unpacked `nvidia` package to an installed one in a fresh interpreter
    installed = tmp_path / "installed"
    os.makedirs(installed / "nvidia")
    (installed / "nvidia" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": f"{dali}{os.pathsep}{installed}"}
    code = "import nvidia.dali as d; print(d.__version__)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "2.4.0", done.stderr


def test_kit_refuses_a_corrupt_part(tmp_path):
    kit = _stand_in_wheels(tmp_path)
    m = gpu_kit.build(kit, part_mib=0.1, base_reqs=["omegaconf==2.3.0"], dali_reqs=["nvidia-dali-cuda130==2.4.0"],
                      packed_reqs=[])
    bad = os.path.join(kit, "parts", m["parts"][1]["file"])
    with open(bad, "r+b") as f:
        f.write(b"\0\0\0")
    with pytest.raises(gpu_kit.KitError, match="sha256"):
        gpu_kit.unpack(kit, str(tmp_path / "dest"))
    assert not (tmp_path / "dest" / "dali").exists()
