"""Host-side memory plumbing: glibc's allocator setting and the GIL-free file reader."""
import platform

import numpy as np
import pytest

from pipelines.sources import read_bytes
from training.cli import keep_freed_host_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_host_memory_applies_on_glibc_and_can_be_disabled(monkeypatch):
    assert keep_freed_host_memory() is True
    monkeypatch.setenv("CRLD_KEEP_FREED_MEMORY", "0")
    assert keep_freed_host_memory() is False


def test_read_bytes_is_the_file_and_writable(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    got = read_bytes(str(tmp_path / "f.bin"))
    assert got.dtype == np.uint8 and got.flags.writeable and np.array_equal(got, data)
    (tmp_path / "empty").write_bytes(b"")
    assert read_bytes(str(tmp_path / "empty")).size == 0
