"""The GPU window's DALI call on the CPU: gpu_window/run.sh's dali stages (a file of their own, so that the two
dry runs, the suite's longest tests, can run in different test processes)."""
import json

import pytest

from pipelines import available_pipelines


@pytest.mark.skipif("dali" not in available_pipelines(), reason="needs nvidia.dali (make setup installs it)")
def test_a_dali_call_measures_step_mode_in_the_same_command(tmp_path, gpu_dry_run):
    """The window runs `r34` and `dali` in different calls; the dali e2e rows are divided by step rates taken
    in the dali call itself (the goal is e2e / step on the same card in the same command)."""
    r = gpu_dry_run(tmp_path / "out", tmp_path / "work", "dali")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [ln.split("\t")[0] for ln in (tmp_path / "out" / "stages.tsv").read_text().splitlines()[1:]]
    assert rows == ["jpeg_data", "r34_step", "dali_check", "dali_loader", "r34_e2e_dali"], rows
    doc = json.loads((tmp_path / "out" / "dali_check.json").read_text())
    assert {c["name"]: c["outcome"] for c in doc["checks"]} == {
        "test_dali_decode_on_device_matches_the_torch_reference": "passed", "test_one_crld_epoch[dali]": "passed"}, doc
    assert "## DALI checks" in (tmp_path / "out" / "summary.md").read_text()
    dali_rows = [ln for ln in (tmp_path / "out" / "summary.md").read_text().splitlines() if ln.startswith("| e2e | dali/")]
    assert len(dali_rows) == 2 and all(ln.rstrip(" |").endswith("%") for ln in dali_rows), dali_rows
