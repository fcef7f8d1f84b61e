"""Where batches go and in what form: the route decision (`on_device`), the batch dtype, the copy to the
training device and the normaliser every backend finishes its views with."""
from concurrent.futures import ThreadPoolExecutor

import torch

from common.precision import amp_dtype


def on_device(cfg, device) -> bool:
    """The route, decided here once and passed down: True for the accelerator route (views cut and
    augmented as batched tensor work on the training device, no per-sample Python in the training
    process), False for the host route (per-sample work on host threads, the fast route on a CPU).
    `pipeline.route=auto` takes the accelerator route when training on CUDA; `device` forces it on a
    CPU too, so the tests and benchmarks run the accelerator route's code without a GPU."""
    route = cfg.pipeline.route
    return route == "device" or (route == "auto" and torch.device(device).type == "cuda")


def input_dtype(cfg, device) -> torch.dtype:
    """The dtype batches arrive in: the autocast dtype when AMP is on (the first conv would cast to it
    anyway, so values are the same and the normalised views take half the memory and bandwidth; the
    host-to-device copy is uint8 either way), float32 otherwise."""
    return amp_dtype(cfg.run.amp, torch.device(device)) or torch.float32


def helper_threads(workers: int, device, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads have the training device as their current CUDA device. The current device
    is per thread: a new thread that pins memory would otherwise do it on GPU 0, where each DDP rank would then
    hold a CUDA context of its own."""
    device = torch.device(device)
    if device.type != "cuda":
        return ThreadPoolExecutor(workers, thread_name_prefix=name)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=torch.cuda.set_device, initargs=(index,))


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A host tensor onto `device` without waiting: on CUDA through pinned memory (a copy from pageable
    memory waits for the stream and the host). Safe for buffers a loader reuses: pinning copies."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        x = x if x.is_pinned() else x.pin_memory()
    return x.to(device, non_blocking=True)


class Normalizer:
    """uint8 NHWC (host or device) -> normalised NCHW channels-last on `device`, in `dtype` (computed
    in float32, rounded once on store). `into` normalises on its input's device, so the host route can
    normalise host tensors with the training device's normaliser."""

    def __init__(self, mean_std, device, dtype=torch.float32):
        mean, std = mean_std
        self.device, self.dtype = torch.device(device), dtype
        # computed once on the host: every device's rows are copies of the same float32 values
        self.inv_std = 1.0 / (torch.tensor(std) * 255.0)
        self.bias = -torch.tensor(mean) * 255.0 * self.inv_std
        self._rows = {}

    @classmethod
    def for_run(cls, mean_std, cfg, device) -> "Normalizer":
        return cls(mean_std, device, input_dtype(cfg, device))

    def _row(self, width: int, device: torch.device):
        # The (3,) scale and shift repeated along one image row: x * inv_std + bias over a (rows, W*3)
        # view then runs a vectorised inner loop of W*3 elements; broadcasting (3,) over the channel
        # axis gives an inner loop of 3, several times slower on a CPU (docs/benchmarks.md).
        # Per device: the host route normalises host tensors; the upload to the device happens once.
        key = (width, device)
        if key not in self._rows:
            self._rows[key] = (self.bias.repeat(width).to(device), self.inv_std.repeat(width).to(device))
        return self._rows[key]

    def into(self, x_hwc_uint8: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Normalise one (..., H, W, 3) uint8 tensor into the float `out` of the same shape."""
        w = x_hwc_uint8.shape[-2]
        bias, inv = self._row(w, x_hwc_uint8.device)
        torch.addcmul(bias, x_hwc_uint8.reshape(-1, w * 3), inv, out=out.view(-1, w * 3))
        return out

    def __call__(self, x_nhwc_uint8: torch.Tensor) -> torch.Tensor:
        # One fused uint8 -> float pass on the contiguous NHWC tensor, then a permuted view: that view
        # *is* NCHW in channels-last memory, so no layout copy is needed.
        x = to_device(x_nhwc_uint8, self.device)
        out = torch.empty(x.shape, dtype=self.dtype, device=self.device)
        return self.into(x, out).permute(0, 3, 1, 2)
