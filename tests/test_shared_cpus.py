"""A good neighbour on shared CPUs: every entry point shortens OpenMP's spin-wait before torch loads OpenMP
(which reads the setting once), unless the user chose a wait policy or a spin count."""
import os
import subprocess
import sys

import pytest

from common.cpus import SPIN_COUNT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In a fresh interpreter: GOMP_SPINCOUNT as it is at the moment `torch` is first imported by MODULE.
PROBE = """
import importlib, os, sys
seen = []
class FirstTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))
sys.meta_path.insert(0, FirstTorchImport())
importlib.import_module(sys.argv[1])
print(seen[0] if seen else "torch not imported")
"""


def _spin_at_torch_import(module, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    r = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True, text=True,
                       env={**base, **env}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ["train", "eval", "cache_teacher", "demo", "bench.__main__"])
def test_each_entry_point_sets_the_spin_before_torch_loads(module):
    assert _spin_at_torch_import(module) == SPIN_COUNT


def test_the_users_choice_is_kept():
    assert _spin_at_torch_import("train", GOMP_SPINCOUNT="5") == "5"
    assert _spin_at_torch_import("train", OMP_WAIT_POLICY="ACTIVE") == "None"
