"""`dali`: NVIDIA DALI backend. One DALI graph per step: read and decode each image once and cut both
views from that decode; the strong view then gets the paper's RandAugment + Cutout.

Routes (`pipelines.device.on_device`, decided once by `pipelines.build_loaders` and passed in):
- accelerator (`device`, the default on CUDA): DALI reads the files itself (`fn.io.file.read` from a
  table of paths), decodes (nvJPEG `mixed` on a GPU, libjpeg-turbo on a CPU) and cuts both views (crop /
  resized crop + flip) from per-sample boxes; the strong view goes through the batched tensor augmenter
  (`pipelines.randaugment_segmented`) on the device, then normalisation. The training process's Python work
  per batch is a fixed number of numpy calls, whatever the batch size.
- host (`host`, the default on a CPU): DALI decodes only the region the two views need, and the host
  cuts them with torch's resize and PIL's ops on a thread pool (faster than DALI's CPU resize and the
  tensor ops on a CPU: docs/benchmarks.md).

Every random choice comes from `pipelines.view_params` (a pure function of seed, epoch, index, view),
drawn for a whole batch at once from a table of image sizes made when the loader is built; the strong
parameters are redrawn by the loader from the batch's indices, which DALI hands back. Array datasets
(CIFAR, the demo) are fed as one uint8 NHWC array per batch. Last-batch policy: training drops the
incomplete last batch (`pipeline.drop_last`) after the sampler has padded the epoch so every rank runs
the same number of steps; validation keeps a partial last batch and no padding.
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipelines import cpu_plan
from pipelines.contract import Batch, ValBatch
from pipelines.dali_geometry import path_table, roi, val_geometry
from pipelines.device import Normalizer, to_device
from pipelines.finish_views import strong_on_device, views_from_decoded
from pipelines.randaugment_graph import strong_program
from pipelines.sampler import EpochSampler
from pipelines.sources import DataError, check_decodable, first_readable, image_sizes
from pipelines.upsample import resized_hw
from pipelines.view_params import ViewBatch, draw_views, run_strong_draws

log = logging.getLogger(__name__)


class _Feeder:
    """external_source callback (batch mode): every batch is a dict of named fields, each one array."""

    def __init__(self, source, sampler, batch, cfg, views, train, drop_last, device_route):
        dc = cfg.data
        self.source, self.sampler, self.batch, self.seed, self.views = source, sampler, batch, cfg.run.seed, views
        self.view_kw = dict(crop=dc.train_crop, size=dc.image_size, pad=dc.crop_padding,
                            strong_aug=False)  # the loader draws the strong parameters from the indices
        self.size, self.val_resize, self.resize = dc.image_size, dc.val_resize, dc.resize_source
        self.train, self.drop_last, self.device_route = train, drop_last, device_route
        self.encoded = hasattr(source, "files")
        self.skip_bad = getattr(source, "skip_bad", False)
        self.paths = path_table(source.files) if self.encoded else None
        self.sizes = (image_sizes(source, cache=cfg.pipeline.dali_size_cache)
                      if self.encoded or train or self.resize else None)
        self.labels = np.asarray(source.labels, dtype=np.int64).reshape(-1, 1)
        self.substitute = np.full(len(source), -1, dtype=np.int64)  # skip mode: the sample read instead
        # the whole image where the source is resized first
        self.roi = train and self.encoded and not device_route and not self.resize
        self.keys, self.pos, self.epoch = None, 0, 0
        # training: an epoch's end leads straight into the next epoch's batches, so DALI has them in flight
        # when the loop reaches the boundary; the loader stops it (follow=False) to leave an epoch early
        self.follow = train
        self.recent = collections.deque(maxlen=8)  # source indices of recent batches, to name a bad file
        if not train:
            self.fields = ("data", "label", "index") + (("resize", "anchor") if self.encoded or self.resize else ())
        elif device_route:
            self.fields = ("data", "label", "index") + (("src_size",) if self.resize else ()) + tuple(
                f"{v}_{k}" for v in ("weak", "strong")[:views] for k in ("box", "flip"))
        else:
            self.fields = ("data", "label", "index", "boxes") + (("roi_anchor", "roi_shape") if self.roi else ())
        # the route's form of a training batch's boxes (cut in DALI's graph, or by the host), fixed here
        self._boxes = self._boxes_for_graph if device_route else self._boxes_for_host

    def start(self, epoch, pos: int = 0):
        self.epoch, self.keys, self.pos = epoch, None, pos

    def _resolve(self, idx: np.ndarray) -> np.ndarray:
        """Skip mode: the first readable sample from i on (the torch backend substitutes the same); each
        file is checked once per run, so after the first epoch this is one lookup."""
        if not (self.encoded and self.skip_bad):
            return idx
        for i in idx[self.substitute[idx] < 0].tolist():
            self.substitute[i] = first_readable(self.source.files, i, check_decodable)[0]
        return self.substitute[idx]

    def __call__(self):
        if self.keys is None:
            self.sampler.set_epoch(self.epoch)
            self.keys = np.asarray(self.sampler.indices(), dtype=np.int64)
        left = len(self.keys) - self.pos
        if left <= 0 or (self.drop_last and left < self.batch):
            if not self.follow or self.pos == 0:  # (an epoch too short for one batch never follows)
                raise StopIteration
            self.start(self.epoch + 1)
            return self()
        idx = self.keys[self.pos:self.pos + self.batch]
        self.pos += len(idx)
        src = self._resolve(idx)
        self.recent.append(src)
        out = {"data": self.paths[src] if self.encoded else self.source.images[src],
               "label": self.labels[src], "index": idx.reshape(-1, 1)}  # a substitute keeps its own label
        if not self.train:
            if self.encoded or self.resize:
                out["resize"], out["anchor"] = val_geometry(self.sizes[src], self.size, self.val_resize, self.resize)
            return [out[f] for f in self.fields]
        hw = resized_hw(self.sizes[src], self.resize) if self.resize else self.sizes[src]
        if self.resize and self.device_route:
            out["src_size"] = hw.astype(np.float32)
        self._boxes(out, draw_views(self.seed, self.epoch, idx, hw, **self.view_kw).boxes, src)
        return [out[f] for f in self.fields]

    def _boxes_for_graph(self, out, boxes, src):
        for k, v in enumerate(("weak", "strong")[:self.views]):
            out[f"{v}_box"] = np.ascontiguousarray(boxes[:, k, :4], dtype=np.float32)
            out[f"{v}_flip"] = np.ascontiguousarray(boxes[:, k, 4])

    def _boxes_for_host(self, out, boxes, src):
        if self.roi:  # decode only the region both views need; boxes become relative to it
            y0, x0, y1, x1 = roi(self.sizes[src], boxes[:, :self.views])
            out["roi_anchor"], out["roi_shape"] = np.stack([y0, x0], 1), np.stack([y1 - y0, x1 - x0], 1)
            boxes[:, :, 0] -= y0[:, None]
            boxes[:, :, 1] -= x0[:, None]
        out["boxes"] = boxes


def _inputs(feeder, encoded_layout=None):
    nodes = fn.external_source(source=feeder, num_outputs=len(feeder.fields), batch=True,
                               layout=[encoded_layout if f == "data" else None for f in feeder.fields])
    return dict(zip(feeder.fields, nodes))


def _view(img, box, flip, crop, size):
    anchor, shape = box[0:2], box[2:4]
    if crop == "pad":  # RandomCrop with zero padding: a slice that may leave the image
        v = fn.slice(img, anchor, shape, normalized_anchor=False, normalized_shape=False, axis_names="HW",
                     out_of_bounds_policy="pad", fill_values=0)
    else:
        v = fn.resize(img, roi_start=anchor, roi_end=anchor + shape, roi_relative=False, size=[size, size],
                      interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.flip(v, horizontal=flip)


def _outputs(train: bool, device_route: bool, views: int):
    """The graph's outputs by name, in the order it returns them."""
    if not train:
        return ("image", "label", "index")
    if device_route:
        return ("weak", "strong")[:views] + ("label", "index")
    return ("image", "label", "index", "boxes")


# Decoders keep the stored orientation (adjust_orientation=False), as PIL and torchvision's loader do: the
# crop boxes are drawn from the stored size, and DALI's default would rotate by the EXIF tag.
@pipeline_def(enable_conditionals=False)
def _train_graph(feeder, decode_device, crop, size, views):
    f = _inputs(feeder, None if feeder.encoded else "HWC")
    if feeder.roi:  # host route: decode only the union of the two crops (libjpeg-turbo skips the rest)
        img = fn.decoders.image_slice(fn.io.file.read(f["data"]), f["roi_anchor"], f["roi_shape"],
                                      normalized_anchor=False, normalized_shape=False, axis_names="HW",
                                      device="cpu", output_type=types.RGB, adjust_orientation=False)
    elif feeder.encoded:
        img = fn.decoders.image(fn.io.file.read(f["data"]), device=decode_device, output_type=types.RGB,
                                adjust_orientation=False)
    else:
        img = f["data"].gpu() if decode_device == "mixed" else f["data"]
    if not feeder.device_route:
        return img, f["label"], f["index"], f["boxes"]
    if feeder.resize:  # DALI's cubic filter: within the documented tolerance of PIL's (docs/design.md)
        img = fn.resize(img, size=f["src_size"], interp_type=types.INTERP_CUBIC, antialias=True)
    cut = [_view(img, f[f"{v}_box"], f[f"{v}_flip"], crop, size) for v in ("weak", "strong")[:views]]
    return (*cut, f["label"], f["index"])


@pipeline_def(enable_conditionals=False)
def _val_graph(feeder, decode_device, size):
    f = _inputs(feeder, None if feeder.encoded else "HWC")
    if feeder.encoded or feeder.resize:
        if feeder.encoded:
            img = fn.decoders.image(fn.io.file.read(f["data"]), device=decode_device, output_type=types.RGB,
                                    adjust_orientation=False)
        else:
            img = f["data"].gpu() if decode_device == "mixed" else f["data"]
        interp = types.INTERP_CUBIC if feeder.resize else types.INTERP_LINEAR
        img = fn.resize(img, size=f["resize"], interp_type=interp, antialias=True)
        img = fn.slice(img, f["anchor"], [size, size], normalized_anchor=False, normalized_shape=False,
                       axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    else:  # array datasets are validated at their native size
        img = f["data"].gpu() if decode_device == "mixed" else f["data"]
    return img, f["label"], f["index"]


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A DALI batch as a torch tensor on `device`, never aliasing DALI's buffers (DALI reuses them)."""
    from nvidia.dali.tensors import TensorListGPU
    if isinstance(tl, TensorListGPU):  # stays on the GPU: DALI's buffer -> a torch tensor, no host trip
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    host = torch.from_numpy(tl.as_array())
    return to_device(host, device) if device.type == "cuda" else host.clone()


class _DaliLoader:
    """What the training and validation loaders share: stepping DALI, and stopping it cleanly when an
    iteration ends early. `_batches` (per subclass) turns DALI's outputs into contract batches."""

    def __init__(self, feeder, pipe, steps, normalize, outputs):
        self.feeder, self.pipe, self.steps, self.normalize, self.outputs = feeder, pipe, steps, normalize, outputs
        # the epoch whose first batch is next out of DALI (the feeder followed into it), None when stopped
        self.epoch, self.start, self._live, self._flowing = 0, 0, None, None

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.steps

    def _run(self):
        try:
            return dict(zip(self.outputs, self.pipe.run()))
        except StopIteration:
            raise
        except RuntimeError as e:
            raise _translate(e, self.feeder) from None

    def _drain(self):
        """Stop DALI where it is (an iteration left early, or the next epoch asked for is not the one in
        flight): end the feeder's epoch and drain the batches DALI has already prefetched, else the next
        iteration would start with them (another epoch's views)."""
        follow, self.feeder.follow = self.feeder.follow, False
        self.feeder.keys, self.feeder.pos, self._flowing = np.zeros(0, dtype=np.int64), 0, None
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            self.pipe.reset()
        except Exception as e:  # noqa: BLE001 - may run during garbage collection: never raise there
            log.warning("DALI pipeline could not be drained after an early stop: %s", str(e).splitlines()[0])
        finally:
            self.feeder.follow = follow

    def __iter__(self):
        if self._live is not None:  # an earlier iterator still open (held, not closed): end it first
            self._drain()
        me = self._live = object()
        try:
            yield from self._batches()
            self._live = None
        except GeneratorExit:
            if self._live is me:  # a stale iterator closed later must not end the current one
                self._live = None
                self._drain()
            raise
        except BaseException:
            self._live = self._flowing = None  # the error ended this epoch; nothing left to drain
            raise

    def _targets(self, outs):
        """(label, index) on the device and the index on the host, copied: DALI reuses its buffers."""
        dev = self.normalize.device
        label = torch.from_numpy(np.array(outs["label"].as_array()).reshape(-1))
        index_cpu = torch.from_numpy(np.array(outs["index"].as_array()).reshape(-1))
        return to_device(label, dev), to_device(index_cpu, dev), index_cpu


class _DaliTrainLoader(_DaliLoader):
    def __init__(self, feeder, pipe, steps, normalize, cfg, views, host_threads):
        super().__init__(feeder, pipe, steps, normalize, _outputs(True, feeder.device_route, views))
        self.cfg, self.views, self.host_threads = cfg, views, host_threads
        self.strong_program = strong_program(cfg.pipeline.strong_program)
        # the route, fixed when the loader is built: views cut by DALI, or on the host
        self._views = self._device_views if feeder.device_route else self._views_on_host

    def _epoch_outputs(self):
        """`steps` batches of this epoch. When the previous iteration ran to its end, DALI is already on
        this epoch's batches (the feeder followed into them); otherwise it starts here."""
        if self._flowing != self.epoch or self.start:
            if self._flowing is not None:
                self._drain()
            self.feeder.start(self.epoch, self.start * self.feeder.batch)
        self._flowing = None
        for _ in range(self.start, self.steps):
            yield self._run()
        self._flowing = self.epoch + 1

    def _device_views(self, outs, strong):
        """Views cut by DALI; the strong augmentation as batched tensor ops on the device."""
        dev = self.normalize.device
        weak = self.normalize(_to_torch(outs["weak"], dev))
        if self.views == 1:
            return weak, None
        return weak, self.normalize(strong_on_device(_to_torch(outs["strong"], dev), strong, dev, self.strong_program))

    def _views_on_host(self, outs, strong):
        """Views cut from the decoded images on the host (`pipelines.finish_views`)."""
        vb = ViewBatch(np.array(outs["boxes"].as_array()), strong)
        return views_from_decoded([np.asarray(im) for im in outs["image"]], vb, self.cfg.data.image_size, self.views,
                                  self.normalize, self.host_threads, self.feeder.resize)

    def _batches(self):
        for outs in self._epoch_outputs():
            y, i, index_cpu = self._targets(outs)
            strong = run_strong_draws(self.cfg, self.epoch, index_cpu.numpy(), self.views)
            yield Batch(*self._views(outs, strong), y, i, index_cpu)


class _DaliValLoader(_DaliLoader):
    def __init__(self, feeder, pipe, steps, normalize):
        super().__init__(feeder, pipe, steps, normalize, _outputs(False, feeder.device_route, 1))

    def _batches(self):
        self.feeder.start(self.epoch)
        while True:
            try:
                outs = self._run()
            except StopIteration:
                self.pipe.reset()
                return
            y, i, _ = self._targets(outs)
            yield ValBatch(self.normalize(_to_torch(outs["image"], self.normalize.device)), y, i)


def _translate(e: RuntimeError, feeder) -> DataError:
    """DALI reports decoder failures without our file names: find the culprit in recent batches."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    after = [lines[k + 1] for k, ln in enumerate(lines[:-1]) if ln == "encountered:"]
    first = after[0] if after else next((ln for ln in lines if "Critical error" not in ln), type(e).__name__)
    if feeder.encoded:
        for src in reversed(feeder.recent):
            for j in src.tolist():
                try:
                    check_decodable(feeder.source.files[j])
                except DataError as de:
                    return DataError(f"{de}; DALI: {first[:200]}")
    return DataError(f"DALI pipeline failed: {first[:300]}")


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _build(source, cfg, device, rank, world, train, views, device_route):
    pc = cfg.pipeline
    dec = "mixed" if device_route and device.type == "cuda" else "cpu"
    batch = pc.batch_size // world if train else pc.val_batch_size
    sampler = EpochSampler(len(source), seed=cfg.run.seed if train else 0, shuffle=train, rank=rank,
                           world=world, pad=train)
    drop_last = train and pc.drop_last
    feeder = _Feeder(source, sampler, batch, cfg, views, train, drop_last, device_route)
    plan = cpu_plan(cfg, device)
    kw = dict(batch_size=batch, num_threads=plan.dali_threads,
              device_id=_device_index(device) if dec == "mixed" else None,
              prefetch_queue_depth=pc.dali_prefetch, seed=cfg.run.seed, exec_dynamic=True)
    if train:
        pipe = _train_graph(feeder, dec, cfg.data.train_crop, cfg.data.image_size, views, **kw)
    else:
        pipe = _val_graph(feeder, dec, cfg.data.image_size, **kw)
    pipe.build()
    n = len(sampler)
    steps = n // batch if drop_last else -(-n // batch)
    norm = Normalizer.for_run(source.mean_std, cfg, device)
    if train:
        return _DaliTrainLoader(feeder, pipe, steps, norm, cfg, views, plan.host_threads)
    return _DaliValLoader(feeder, pipe, steps, norm)


def build_train(source, cfg, device, rank: int = 0, world: int = 1, views: int = 2, *, device_route: bool):
    return _build(source, cfg, device, rank, world, True, views, device_route)


def build_val(source, cfg, device, rank: int = 0, world: int = 1, *, device_route: bool):
    return _build(source, cfg, device, rank, world, False, 1, device_route)
