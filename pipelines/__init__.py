"""Data backends. Each registers a module with `build_train(source, cfg, device, rank, world, views, *,
device_route)` and `build_val(source, cfg, device, rank, world, *, device_route)` returning loaders that
follow `pipelines.contract`. `device_route` is the route (`pipelines.device.on_device`), decided once by the
caller; a backend with routes picks its code for it when the loader is built. Optional backends (dali,
ffcv) register only when their library imports; `gpu` needs only torch.
"""
import importlib
import importlib.util
from typing import Optional

import torch

from common.cpus import CpuBudget, ThreadPlan, cpu_budget, thread_plan
from common.errors import UserError
from pipelines.device import on_device
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


def cpu_plan(cfg, device, budget: Optional[CpuBudget] = None) -> ThreadPlan:
    """This run's split of its CPU budget (`budget`, else `run.cpus` or the CPUs measured by common.cpus): the
    same counts where an entry point applies them and where a backend starts its threads."""
    p, budget = cfg.pipeline, budget or cpu_budget(cfg.run.cpus)
    return thread_plan(budget.cpus, torch.device(device).type, p.name, not on_device(cfg, device),
                       p.num_workers, p.dali_threads, p.host_threads)


# Every loader of every entry point is made here: the configured backend, the route (`on_device`, a pure
# function of the config and device) and, on CUDA, the prefetcher, which prepares each batch one step ahead
# on a side stream (pipelines.prefetch).

def train_loader(cfg, device, source, rank: int = 0, world: int = 1, views: int = 2):
    """The training loader over `source` (an open training split). `views`: 2 (weak and strong) or 1 (weak
    only), which the trainer decides from its methods (`training.losses.views_needed`)."""
    loader = get_backend(cfg.pipeline.name).build_train(source, cfg, device, rank, world, views,
                                                        device_route=on_device(cfg, device))
    return prefetched(loader, device)


def val_loader(cfg, device, rank: int = 0, world: int = 1, train_classes=None):
    """(the validation loader, its source); `train_classes` maps folder classes to the training split's."""
    source = open_split(cfg, train=False, train_classes=train_classes)
    loader = get_backend(cfg.pipeline.name).build_val(source, cfg, device, rank, world,
                                                      device_route=on_device(cfg, device))
    return prefetched(loader, device), source


def build_loaders(cfg, device, rank: int = 0, world: int = 1, views: int = 2):
    """(train_loader, val_loader, train_source) for the configured dataset and backend."""
    train_src = open_split(cfg, train=True)
    return (train_loader(cfg, device, train_src, rank, world, views),
            val_loader(cfg, device, rank, world, train_src.classes)[0], train_src)
