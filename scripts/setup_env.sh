#!/usr/bin/env bash
# Create or reuse .venv and install everything the project needs (idempotent), the project itself included
# (editable: every entry point, script and test imports the packages of pyproject.toml as installed).
#   bash scripts/setup_env.sh          # called by `make demo` / `make test`
# A stamp file keyed on the requirement files makes a second run cheap: it only checks that .venv's Python
# imports the project from this checkout, and installs it (a few seconds) when it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$(pwd -P)
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.installed-$(cat requirements.txt requirements-ffcv.txt pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)"

# From another folder, so the check sees the installed project and not the current directory.
project_installed() {
  (cd / && "$HERE/$VENV/bin/python" -c 'import sys, training; from pathlib import Path
sys.exit(Path(training.__file__).resolve().parents[1] != Path(sys.argv[1]))' "$HERE") 2>/dev/null
}
install_project() {
  # No build isolation: the venv's setuptools builds it, so this works offline.
  PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true)
}
if [ -f "$STAMP" ]; then
  project_installed || install_project
  exit 0
fi

# System libraries for the FFCV build.
SYS_PKGS="pkg-config libturbojpeg0-dev libopencv-dev"
missing=""
for p in $SYS_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install -y$missing"
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null; then
      echo "[setup] apt-get failed: install$missing by hand for FFCV; continuing without FFCV" >&2
    fi
  else
    echo "[setup] cannot apt-get (not root or no apt): install$missing with your package manager for FFCV; continuing without FFCV" >&2
  fi
fi

# The CUDA build of torch plus DALI take about 7 GiB unpacked; pip also unpacks in $TMPDIR. A full disk
# otherwise ends in pip's bare "[Errno 28] No space left on device" halfway through.
NEED_GIB=9
free_gib() { df -Pk "$1" 2>/dev/null | awk 'NR==2 {print int($4 / 1048576)}'; }
# CRLD_VENV_FALLBACK=DIR (.ci/run sets /dev/shm): where this disk lacks the space, the environment is made in
# DIR (a RAM-backed tmpfs holds it in memory) and .venv links to it. Only when DIR has the space and the
# memory left beside it is at least RAM_LEFT_GIB, for the runs the environment is for.
RAM_LEFT_GIB=10
# CRLD_MEMINFO: another meminfo file (the tests').
avail_ram_gib() { awk '/^MemAvailable:/ {print int($2 / 1048576)}' "${CRLD_MEMINFO:-/proc/meminfo}" 2>/dev/null; }
fb=${CRLD_VENV_FALLBACK:-}
if [ -n "$fb" ] && [ ! -e "$VENV" ] && [ ! -L "$VENV" ] && [ "$(free_gib .)" -lt "$NEED_GIB" ]; then
  fb_free=$(free_gib "$fb"); ram=$(avail_ram_gib)
  if [ -n "$fb_free" ] && [ "$fb_free" -ge "$NEED_GIB" ] && [ -n "$ram" ] && [ $((ram - NEED_GIB)) -ge "$RAM_LEFT_GIB" ]; then
    target="$fb/crld-venv-$(printf %s "$HERE" | sha1sum | cut -c1-8)"
    ln -s "$target" "$VENV"
    echo "[setup] $(free_gib .) GiB free here, ${NEED_GIB} needed: the environment goes to $target (${fb_free} GiB free, ${ram} GiB of memory available), .venv links to it" >&2
  else
    echo "[setup] CRLD_VENV_FALLBACK=$fb cannot take the environment (${fb_free:-?} GiB free there, ${ram:-?} GiB of memory available; ${NEED_GIB} GiB needed, ${RAM_LEFT_GIB} to be left)" >&2
  fi
fi
if [ -L "$VENV" ]; then
  # pip's downloads and unpacking beside the environment, not on the short disk; the folder made (again,
  # where a reboot emptied the tmpfs) where the link points.
  export TMPDIR="$(readlink "$VENV")/tmp"
  mkdir -p "$TMPDIR"
fi
for d in "$VENV" "${TMPDIR:-/tmp}"; do
  [ -e "$d" ] || d=.
  f=$(free_gib "$d")
  if [ -n "$f" ] && [ "$f" -lt "$NEED_GIB" ]; then
    echo "[setup] warning: only ${f} GiB free on the filesystem of $(cd "$d" && pwd); the environment needs about ${NEED_GIB} GiB" >&2
  fi
done
# No wheel cache: it would keep a second copy of every wheel on the same disk.
export PIP_NO_CACHE_DIR=1
pip_failed() {
  echo "[setup] pip install failed (free space: $(free_gib .) GiB here, $(free_gib "${TMPDIR:-/tmp}") GiB in ${TMPDIR:-/tmp}; about ${NEED_GIB} GiB are needed)" >&2
  exit 1
}

# venv refuses a link: it makes the environment where a fallback link points.
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$(readlink -f "$VENV")"
# This machine's pip config lists local wheel folders that may not exist; drop that noise only.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true); }
quiet "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools || pip_failed
quiet "$VENV/bin/python" -m pip install -q -r requirements.txt || pip_failed
if pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
  # ffcv's setup.py imports numpy and pkg-config at build time: no build isolation.
  quiet "$VENV/bin/python" -m pip install -q --no-build-isolation -r requirements-ffcv.txt \
    || echo "[setup] FFCV failed to build; the ffcv pipeline will be unavailable" >&2
else
  echo "[setup] skipping FFCV: pkg-config cannot find libturbojpeg/opencv4" >&2
fi
install_project || pip_failed
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "[setup] environment ready in $VENV"
