"""The import structure: layers that never point up, no import cycles, no `sys.path` edits.

Layers, lowest first: `common/` (what every layer shares: the user errors, atomic output files, precision, CPU
shares, fork safety; it imports nothing else of the project), `pipelines/` (data backends, data only),
`training/` (config, models, losses, loop, cache), `datasets_prep/` (conversion programs), the entry
points at the root (train.py, cache_teacher.py, ...), then `bench/` (measurement: it may drive any of them, and
nothing but the tests imports it), then `gpu_window/` (lab tooling that runs the checks and benchmarks on a lent
GPU machine). A module imports only from its own layer or lower ones; every import
statement counts, at module level and inside functions, and no chain of them comes back to where it started.
An import inside a function is only for an optional or heavy dependency (LAZY_OK).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "pipelines", "training", "datasets_prep")  # in layer order, below the entry points
ENTRY_LAYER = len(PACKAGES)
TOP = ("bench", "gpu_window")  # above the entry points


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def project_modules():
    """{dotted name: file} for the installed packages and the root modules."""
    out = {}
    for pkg in PACKAGES + TOP:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            out.update({_module_name(os.path.join(folder, f)): os.path.join(folder, f)
                        for f in files if f.endswith(".py")})
    out.update({f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")})
    return out


MODULES = project_modules()


def layer(name):
    top = name.split(".")[0]
    if top in TOP:
        return ENTRY_LAYER + 1 + TOP.index(top)
    return PACKAGES.index(top) if top in PACKAGES else ENTRY_LAYER


def imports(path, top_level_only=False):
    """(line, imported project module) for every import statement of the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import (the project imports absolutely)"
            base = node.module
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] in {m.split(".")[0] for m in MODULES}]
    return out


def test_the_layout_is_what_this_test_assumes():
    assert {"pipelines", "common.errors", "common.precision", "training.config", "training.cli",
            "datasets_prep.prep_ffcv", "train", "cache_teacher", "bench", "bench.__main__", "bench.loader",
            "bench.call_count", "gpu_window.preflight", "gpu_window.kit"} <= set(MODULES)
    assert layer("gpu_window.preflight") > layer("bench.loader") > layer("cache_teacher") > layer("datasets_prep.prep_ffcv") > layer("training.loop")
    assert layer("training.loop") > layer("pipelines.sources") > layer("common.files")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_never_point_up(module):
    path = MODULES[module]
    up = [f"{os.path.relpath(path, ROOT)}:{line} imports {target}" for line, target in imports(path)
          if layer(target) > layer(module)]
    assert not up, "\n".join(up)


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def late():\n    from training.loop import Trainer\n")
    assert imports(str(f)) == [(2, "training.loop")] and layer("training.loop") > layer("pipelines.x")


def _cycles(graph):
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles_at_any_level():
    """An import inside a function closes a circle as surely as one at the top of the file."""
    graph = {m: {t for _, t in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    cycles = _cycles(graph)
    assert not cycles, "\n".join(cycles)


def test_the_cycle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Imported inside a function, and only these: optional dependencies (a missing one must cost only the
# feature that needs it) and heavy ones whose import would slow every CLI start and spawned test process.
LAZY_OK = {"ffcv": "optional", "nvidia": "optional (DALI)", "apex": "optional", "matplotlib": "heavy",
           "torchvision": "heavy (pulls in torch._dynamo)", "sklearn": "heavy",
           "torch.utils.tensorboard": "heavy (the tensorboard package), only with run.tensorboard",
           "timm": "heavy (~3 s), only for timm:<arch> models", "safetensors": "optional, .safetensors checkpoints"}


def _lazy_ok(name):
    return any(name == k or name.startswith(k + ".") for k in LAZY_OK)


def _top_names(node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module] if isinstance(node, ast.ImportFrom) else []


def _wraps_lazy_dep(module):
    """A project module that imports one of LAZY_OK at its top (report -> matplotlib): importing it late is
    importing that dependency late."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    return any(_lazy_ok(n) for node in tree.body for n in _top_names(node))


def late_imports(path):
    """(line, module) for every import statement inside a function of the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    return [(node.lineno, name) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn) for name in _top_names(node)]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_inside_functions_only_for_optional_or_heavy_dependencies(module):
    path = MODULES[module]
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports {name} inside a function" for line, name in late_imports(path)
           if not _lazy_ok(name) and not (name in MODULES and _wraps_lazy_dep(name))]
    assert not bad, "\n".join(bad)


def test_the_late_import_check_sees_them(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def late():\n    import json\n    from ffcv.loader import Loader\n")
    assert late_imports(str(f)) == [(2, "json"), (3, "ffcv.loader")]


def _py_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "build")]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_no_file_edits_sys_path():
    edits = []
    for path in _py_files():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            targets = node.targets if isinstance(node, ast.Assign) else [target] if target is not None else []
            if any(isinstance(t, ast.Attribute) and t.attr == "path" and isinstance(t.value, ast.Name)
                   and t.value.id == "sys" for t in targets):
                edits.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not edits, edits
