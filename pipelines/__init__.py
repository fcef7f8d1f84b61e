"""Data backends. Each registers a module with `build_train(source, cfg, device, rank, world, views, *,
device_route)` and `build_val(source, cfg, device, rank, world, *, device_route)` returning loaders that
follow `pipelines.contract`. `device_route` is the route (`pipelines.device.on_device`), decided once by the
caller; a backend with routes picks its code for it when the loader is built. Optional backends (dali,
ffcv) register only when their library imports; `gpu` needs only torch.
"""
import importlib
import importlib.util

from pipelines.device import on_device
from pipelines.errors import UserError
from pipelines.prefetch import prefetched
from pipelines.splits import open_split

_BACKENDS = {"torch": "pipelines.torch_backend", "gpu": "pipelines.gpu_backend"}
# name -> (module, library it needs)
_OPTIONAL = {"dali": ("pipelines.dali_backend", "nvidia.dali"), "ffcv": ("pipelines.ffcv_backend", "ffcv")}


def available_pipelines():
    names = list(_BACKENDS)
    for name, (_, lib) in _OPTIONAL.items():
        if importlib.util.find_spec(lib) is not None:
            names.append(name)
    return tuple(names)


def get_backend(name: str):
    if name in _BACKENDS:
        return importlib.import_module(_BACKENDS[name])
    if name in _OPTIONAL:
        return importlib.import_module(_OPTIONAL[name][0])
    raise UserError(f"unknown pipeline '{name}'; available: {', '.join(available_pipelines())}")


# Methods that train on the weak and the strong view; the rest skip the strong view (their weak view is the same).
TWO_VIEW_METHODS = ("crld", "mlkd")


def views_needed(method: str) -> int:
    """Views a method trains on (1 or 2)."""
    return 2 if method in TWO_VIEW_METHODS else 1


def build_loaders(cfg, device, rank: int = 0, world: int = 1, views: int = 0):
    """(train_loader, val_loader, train_source) for the configured dataset and backend. `views`: 1 (weak only)
    or 2 (weak and strong); 0 takes it from cfg.method (a group of students passes the most any needs)."""
    train_src = open_split(cfg, train=True)
    val_src = open_split(cfg, train=False, train_classes=train_src.classes)
    backend = get_backend(cfg.pipeline.name)
    views = views or views_needed(cfg.method.name)
    route = on_device(cfg, device)  # decided once, here, for both loaders
    # on CUDA each batch is prepared one step ahead on a side stream (pipelines.prefetch)
    return (prefetched(backend.build_train(train_src, cfg, device, rank, world, views, device_route=route), device),
            prefetched(backend.build_val(val_src, cfg, device, rank, world, device_route=route), device), train_src)
