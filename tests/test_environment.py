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


def _setup_script_copy(tmp_path, free_kib_here: int, free_kib_fallback: int, ram_kib: int = 23 << 20):
    """scripts/setup_env.sh with what its stamp reads, in a checkout of its own, and a PATH where `df` reports
    the given free space (the fallback folder's when asked of it), `dpkg` has every package, and the Python
    that would make the environment records where it was asked to and stops there; `ram_kib` available."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repo, fallback, bin_dir = tmp_path / "checkout", tmp_path / "ram", tmp_path / "bin"
    for d in (repo / "scripts", fallback, bin_dir):
        d.mkdir(parents=True)
    for f in ("requirements.txt", "requirements-ffcv.txt", "pyproject.toml", "scripts/setup_env.sh"):
        shutil.copy(os.path.join(root, f), repo / f)
    (bin_dir / "df").write_text(
        "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        f"case \"$2\" in {fallback}*) echo \"x 1 1 {free_kib_fallback} 1% /r\" ;; "
        f"*) echo \"x 1 1 {free_kib_here} 1% /\" ;; esac\n")
    (bin_dir / "dpkg").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "python-stub").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/venv-args\nexit 3\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "meminfo").write_text(f"MemTotal: {24 << 20} kB\nMemAvailable: {ram_kib} kB\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python-stub"),
           "CRLD_VENV_FALLBACK": str(fallback),
           "CRLD_MEMINFO": str(tmp_path / "meminfo")}
    r = subprocess.run(["bash", str(repo / "scripts/setup_env.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    return repo, fallback, r


def test_a_disk_too_small_puts_the_environment_in_the_fallback_folder(tmp_path):
    repo, fallback, r = _setup_script_copy(tmp_path, free_kib_here=3 << 20, free_kib_fallback=64 << 20)
    venv = repo / ".venv"
    assert r.returncode == 3, r.stderr  # stopped by the stub, where the environment would be made
    assert venv.is_symlink() and os.path.dirname(os.readlink(venv)) == str(fallback), r.stderr
    # venv refuses a link: it is asked to make the environment at the link's target
    assert (tmp_path / "venv-args").read_text().split() == ["-m", "venv", os.readlink(venv)]
    assert "3 GiB free here, 9 needed" in r.stderr


def test_a_disk_with_room_keeps_the_environment_in_the_checkout(tmp_path):
    repo, fallback, r = _setup_script_copy(tmp_path, free_kib_here=64 << 20, free_kib_fallback=64 << 20)
    assert r.returncode == 3, r.stderr
    assert not (repo / ".venv").is_symlink() and not any(fallback.iterdir())
    assert (tmp_path / "venv-args").read_text().split() == ["-m", "venv", str(repo / ".venv")]


@pytest.mark.parametrize("fallback_kib, ram_kib, why", [(2 << 20, 23 << 20, "2 GiB free there, 23 GiB"),
                                                        (64 << 20, 18 << 20, "64 GiB free there, 18 GiB")])
def test_a_fallback_without_room_or_memory_beside_it_is_refused_in_one_line(tmp_path, fallback_kib, ram_kib, why):
    repo, fallback, r = _setup_script_copy(tmp_path, 3 << 20, fallback_kib, ram_kib)
    assert not (repo / ".venv").is_symlink() and not any(fallback.iterdir())
    assert f"CRLD_VENV_FALLBACK={fallback} cannot take the environment ({why} of memory available" in r.stderr
