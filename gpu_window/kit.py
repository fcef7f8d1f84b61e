"""The device kit: what a bare GPU machine (PyTorch + CUDA 13, Python 3.12, no network) lacks to run
`gpu_window/run.sh` (`pytest -m cuda` and `timm:<arch>` models included), packed to travel in pieces of at most
58 MiB (a GPU call carries 64 MiB in all: the working tree and base/ take the rest, with room to grow).

    python -m gpu_window.kit build .gpu_kit       # here: downloads the cp312 wheels from PyPI, packs them
    python -m gpu_window.kit check .gpu_kit       # here: every piece within the travel limit (also after build)
    python -m gpu_window.kit unpack .gpu_kit /tmp/kit [--parts DIR]   # there: verify, join, unpack

Layout of the kit folder (git-ignored):
  base/      the small pure-Python wheels (omegaconf, antlr4), packed-site.tar.xz (timm and pytest, unpacked from
             their wheels and xz'd), the parts' SHA256SUMS and MANIFEST.{json,md} (exact wheel names, versions, sizes):
             carried on every GPU call
  parts/     dali-site.tar.xz.NN: DALI 2.4 with nvImageCodec and nvJPEG and their pure-Python needs, unpacked
             from the wheels into one site folder (extension modules of other CPython versions dropped), xz'd,
             cut into pieces: one carried per GPU call
  downloads/ the wheels as downloaded (reused by the next build; never carried)
`unpack` gathers the parts carried so far into `--parts` (default DEST/parts), verifies each against
SHA256SUMS, and once all are there unpacks DALI into DEST/dali (with a sitecustomize.py that joins its
`nvidia` package to the installed one in every interpreter, subprocesses included); the base wheels and
packed-site.tar.xz go to DEST/site. It prints the PYTHONPATH and LD_LIBRARY_PATH entries to add.
gpu_window/README.md shows the calls.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20
CALL_LIMIT_MIB = 64  # what one GPU call may carry: the working tree plus the carried paths
PART_MIB = 58
PY_TAG = "312"
# Installed there with `pip install --target`: pure Python, missing from the GPU image.
BASE = ["omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3"]
# Pure Python too, but timm's 2.7 MiB wheel beside a 58 MiB part and the tree would pass the call limit: unpacked
# and xz'd into base/, so they arrive with every call. timm's huggingface_hub and safetensors are optional imports
# (weights are never downloaded there; .safetensors checkpoints are the one thing that needs the latter). pytest
# runs the correctness stages (`pytest -m cuda`): 8.3, the last that does not import pygments (~1 MiB more).
PACKED = ["timm==1.0.31", "pytest==8.3.5", "pluggy==1.7.0", "iniconfig==2.3.1"]
PACKED_SITE = "packed-site.tar.xz"
# DALI and what it needs beyond the GPU image (numpy, six, packaging, PyYAML are there); nvimgcodec's
# nvjpeg2k/nvtiff/nvcomp extras are left out: the project decodes JPEG only.
DALI = ["nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-nvjpeg==13.3.2.43",
        "astunparse==1.6.3", "gast==0.7.0", "makefun==1.16.0", "libcst==1.9.0", "nvtx==0.2.17", "optree==0.20.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PART_PREFIX = "dali-site.tar.xz."
SITECUSTOMIZE = '''\
# Written by gpu_window/kit.py: DALI unpacked into this folder lives in an `nvidia` package, and the GPU
# image's CUDA wheels install one too (a regular package, so the two do not merge by themselves). Joined
# here, at start-up, so that every interpreter (subprocesses, spawned workers) imports nvidia.dali.
import os as _os
try:
    import nvidia as _nv
    _p = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "nvidia")
    if hasattr(_nv, "__path__") and _p not in list(_nv.__path__):
        _nv.__path__.append(_p)
except ImportError:
    pass
'''


class KitError(Exception):
    """A one-line reason the kit cannot be built, checked or unpacked."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def _dist_name(req: str) -> str:
    return re.sub(r"[-_.]+", "_", req.split("==")[0]).lower()


def _find_wheel(folder: str, req: str):
    name, version = _dist_name(req), req.split("==")[1]
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        parts = f[:-4].split("-") if f.endswith(".whl") else []
        if len(parts) >= 2 and re.sub(r"[-_.]+", "_", parts[0]).lower() == name and parts[1] == version:
            return os.path.join(folder, f)
    return None


def download(reqs, folder: str) -> list:
    """The cp312 manylinux wheel of each pinned requirement, from PyPI unless already in `folder`; a
    requirement PyPI has only as source (antlr4 4.9.3) is built into a wheel here (pure Python)."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for req in reqs:
        wheel = _find_wheel(folder, req)
        if wheel is None:
            plat = [a for p in PLATFORMS for a in ("--platform", p)]
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", PY_TAG[0] + "." + PY_TAG[1:], "--implementation", "cp", *plat, "-d", folder, req]
            if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
                built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", folder, req],
                                       capture_output=True, text=True)
                if built.returncode != 0:
                    raise KitError(f"{req}: neither a cp{PY_TAG} wheel nor a source build from PyPI "
                                   f"({(built.stderr.strip().splitlines() or ['?'])[-1][:200]})")
            wheel = _find_wheel(folder, req)
            if wheel is None:
                raise KitError(f"{req}: pip reported success but no matching wheel is in {folder}")
        out.append(wheel)
    return out


def _other_python(name: str) -> bool:
    """An extension module built for another CPython than the GPU machine's (DALI and nvImageCodec ship
    one per version, ~4-5 MB each)."""
    m = re.search(r"\.cpython-(\d+t?)-", os.path.basename(name))
    return bool(m) and m.group(1) != PY_TAG


def build_site(wheels, site: str, sitecustomize: bool = True) -> int:
    """Every wheel unpacked into `site` as pip would lay it out (a wheel is a zip of its installed files),
    other CPython versions' extension modules left out, plus sitecustomize.py; returns the bytes written."""
    total = 0
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for info in z.infolist():
                if info.is_dir() or _other_python(info.filename) or info.filename.split("/", 1)[0].endswith(".data"):
                    continue
                path = os.path.join(site, info.filename)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with z.open(info) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, MiB)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(path, mode)
                total += info.file_size
    if sitecustomize:
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
    return total


def _tar_xz(folder: str, path: str) -> None:
    xz = shutil.which("xz")
    if xz:  # multithreaded and ~30% smaller than Python's default preset in the same time
        with open(path, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", folder, "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run([xz, "-T0", "-6", "-c"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait() != 0:
                raise KitError(f"tar of {folder} failed")
    else:
        with tarfile.open(path, "w:xz") as t:
            t.add(folder, arcname=".")


def pack(site: str, parts_dir: str, part_mib: float) -> list:
    """`site` as one tar.xz cut into pieces of at most `part_mib` MiB; returns [(name, bytes, sha256)]."""
    os.makedirs(parts_dir, exist_ok=True)
    for f in os.listdir(parts_dir):
        if f.startswith(PART_PREFIX):
            os.remove(os.path.join(parts_dir, f))
    tmp = os.path.join(parts_dir, ".whole.tar.xz")
    _tar_xz(site, tmp)
    size, limit, out = os.path.getsize(tmp), int(part_mib * MiB), []
    with open(tmp, "rb") as f:
        for k in range(max(1, -(-size // limit))):
            name = f"{PART_PREFIX}{k:02d}"
            path = os.path.join(parts_dir, name)
            with open(path, "wb") as p:
                p.write(f.read(limit))
            out.append((name, os.path.getsize(path), _sha256(path)))
    os.remove(tmp)
    return out


def tree_bytes(root: str = ROOT) -> int:
    """What travels with every GPU call besides the carried paths: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(os.path.join(root, f.decode())) for f in files
               if f and os.path.isfile(os.path.join(root, f.decode())))


def check(kit: str, limit_mib: float = CALL_LIMIT_MIB, tree: int = None) -> dict:
    """Each GPU call carries the tree, base/ and one part: all within `limit_mib`; raises KitError naming the
    part at fault. Returns the sizes."""
    base, parts = os.path.join(kit, "base"), os.path.join(kit, "parts")
    sums = os.path.join(base, "SHA256SUMS")
    if not os.path.isfile(sums):
        raise KitError(f"{sums}: missing (run `python -m gpu_window.kit build {kit}` first)")
    tree = tree_bytes() if tree is None else tree
    base_bytes = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base))
    listed = _read_sums(sums)
    sizes = {}
    for name, digest in listed.items():
        path = os.path.join(parts, name)
        if not os.path.isfile(path):
            raise KitError(f"{path}: listed in {sums} but missing")
        sizes[name] = os.path.getsize(path)
        call = tree + base_bytes + sizes[name]
        if call > limit_mib * MiB:
            raise KitError(f"{path}: a call carrying it would carry {call / MiB:.1f} MiB (tree {tree / MiB:.1f} + "
                           f"base {base_bytes / MiB:.2f} + part {sizes[name] / MiB:.1f}), over {limit_mib} MiB")
    return {"tree_bytes": tree, "base_bytes": base_bytes, "parts": sizes,
            "largest_call_mib": round((tree + base_bytes + max(sizes.values())) / MiB, 2), "limit_mib": limit_mib}


def _read_sums(path: str) -> dict:
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) != 2 or len(fields[0]) != 64:
                raise KitError(f"{path}:{n}: not '<sha256>  <part name>'")
            out[fields[1]] = fields[0]
    return out


def build(kit: str, part_mib: float = PART_MIB, base_reqs=BASE, dali_reqs=DALI, packed_reqs=PACKED) -> dict:
    downloads = os.path.join(kit, "downloads")
    base_wheels, dali_wheels = download(base_reqs, downloads), download(dali_reqs, downloads)
    packed_wheels = download(packed_reqs, downloads)
    base = os.path.join(kit, "base")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    for w in base_wheels:
        shutil.copy(w, base)
    if packed_wheels:
        with tempfile.TemporaryDirectory(dir=kit) as site:
            build_site(packed_wheels, site, sitecustomize=False)
            _tar_xz(site, os.path.join(base, PACKED_SITE))
    with tempfile.TemporaryDirectory(dir=kit) as site:
        unpacked = build_site(dali_wheels, site)
        parts = pack(site, os.path.join(kit, "parts"), part_mib)
    with open(os.path.join(base, "SHA256SUMS"), "w") as f:
        f.writelines(f"{digest}  {name}\n" for name, _, digest in parts)
    manifest = {"python": f"cp{PY_TAG}", "platforms": PLATFORMS,
                "base_wheels": [{"file": os.path.basename(w), "bytes": os.path.getsize(w)} for w in base_wheels],
                "dali_wheels": [{"file": os.path.basename(w), "bytes": os.path.getsize(w)} for w in dali_wheels],
                "packed_wheels": [{"file": os.path.basename(w), "bytes": os.path.getsize(w)} for w in packed_wheels],
                "packed_site_bytes": os.path.getsize(os.path.join(base, PACKED_SITE)) if packed_wheels else 0,
                "dali_site_unpacked_bytes": unpacked,
                "parts": [{"file": n, "bytes": b, "sha256": d} for n, b, d in parts], "part_mib": part_mib}
    with open(os.path.join(base, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    lines = ["# Device kit", "", "| file | MiB |", "|---|---|"]
    lines += [f"| {w['file']} | {w['bytes'] / MiB:.2f} |" for w in manifest["base_wheels"] + manifest["dali_wheels"]]
    lines += [f"| {w['file']} (in base/{PACKED_SITE}: {manifest['packed_site_bytes'] / MiB:.2f} MiB) | "
              f"{w['bytes'] / MiB:.2f} |" for w in manifest["packed_wheels"]]
    lines += ["", f"DALI site folder unpacked: {unpacked / MiB:.0f} MiB; parts:", ""]
    lines += [f"- {n}: {b / MiB:.1f} MiB, sha256 {d}" for n, b, d in parts]
    with open(os.path.join(base, "MANIFEST.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return manifest


def unpack(kit: str, dest: str, parts_dir: str = None) -> dict:
    """There: base wheels into DEST/site; the parts carried so far gathered into `parts_dir`; once all are
    present and verified, DALI unpacked into DEST/dali (idempotent). A corrupt part is removed and named."""
    parts_dir = parts_dir or os.path.join(dest, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    site = os.path.join(dest, "site")
    base = os.path.join(kit, "base")
    if not os.path.isdir(site):
        shutil.rmtree(site + ".tmp", ignore_errors=True)
        for w in sorted(glob.glob(os.path.join(base, "*.whl"))):
            with zipfile.ZipFile(w) as z:
                z.extractall(site + ".tmp")
        if os.path.isfile(os.path.join(base, PACKED_SITE)):
            with tarfile.open(os.path.join(base, PACKED_SITE), "r:xz") as t:
                t.extractall(site + ".tmp", filter="tar")
        os.makedirs(site + ".tmp", exist_ok=True)
        os.replace(site + ".tmp", site)
    listed = _read_sums(os.path.join(base, "SHA256SUMS"))
    for name in listed:
        carried = os.path.join(kit, "parts", name)
        if os.path.isfile(carried) and not os.path.isfile(os.path.join(parts_dir, name)):
            shutil.copy(carried, os.path.join(parts_dir, name) + ".tmp")
            os.replace(os.path.join(parts_dir, name) + ".tmp", os.path.join(parts_dir, name))
    present = []
    for name, digest in listed.items():
        path = os.path.join(parts_dir, name)
        if os.path.isfile(path):
            if _sha256(path) != digest:
                os.remove(path)
                raise KitError(f"{path}: sha256 differs from {base}/SHA256SUMS (removed; carry it again)")
            present.append(name)
    dali = os.path.join(dest, "dali")
    missing = sorted(set(listed) - set(present))
    if not missing and not os.path.isdir(dali):
        joined = io.BytesIO()  # ~160 MB: joined in memory, streamed into tar
        for name in sorted(listed):
            with open(os.path.join(parts_dir, name), "rb") as f:
                shutil.copyfileobj(f, joined, MiB)
        joined.seek(0)
        shutil.rmtree(dali + ".tmp", ignore_errors=True)
        with tarfile.open(fileobj=joined, mode="r:xz") as t:
            t.extractall(dali + ".tmp", filter="tar")
        os.replace(dali + ".tmp", dali)
    ready = os.path.isdir(dali)
    paths = [site] + ([dali] if ready else [])
    return {"site": site, "dali": dali if ready else None, "parts_present": present, "parts_missing": missing,
            "pythonpath": os.pathsep.join(paths),
            "ld_library_path": os.path.join(dali, "nvidia", "cu13", "lib") if ready else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("kit")
    b.add_argument("--part-mib", type=float, default=PART_MIB)
    c = sub.add_parser("check")
    c.add_argument("kit")
    u = sub.add_parser("unpack")
    u.add_argument("kit")
    u.add_argument("dest")
    u.add_argument("--parts")
    u.add_argument("--env", action="store_true", help="print `export` lines for a shell to eval")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            m = build(args.kit, args.part_mib)
            print(open(os.path.join(args.kit, "base", "MANIFEST.md")).read(), end="")
            print(json.dumps(check(args.kit)))
            return 0 if m else 1
        if args.cmd == "check":
            print(json.dumps(check(args.kit)))
            return 0
        r = unpack(args.kit, args.dest, args.parts)
        if args.env:
            print(f"export PYTHONPATH={r['pythonpath']}${{PYTHONPATH:+:$PYTHONPATH}}")
            if r["ld_library_path"]:
                print(f"export LD_LIBRARY_PATH={r['ld_library_path']}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}")
            print(f"# gpu_kit: parts present {len(r['parts_present'])}, missing {r['parts_missing'] or 'none'}; "
                  f"DALI {'unpacked' if r['dali'] else 'not yet'}")
        else:
            print(json.dumps(r))
        return 0
    except KitError as e:
        print(f"gpu_kit: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
