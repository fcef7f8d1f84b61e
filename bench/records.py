"""What every benchmark record carries (the machine it was measured on) and how the records are written."""
from __future__ import annotations

import json
import os
import platform

from common.files import save_atomic


def machine() -> str:
    """The CPU a record was measured on (core count and model name)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def save_json(path, doc):
    save_atomic(os.path.abspath(path), lambda f: f.write(json.dumps(doc, indent=1).encode()))
