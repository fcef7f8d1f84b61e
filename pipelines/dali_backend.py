"""`dali`: NVIDIA DALI backend. One DALI graph per step: decode each image once (nvJPEG `mixed` on a
GPU, libjpeg-turbo on the CPU), cut both views from that decode (crop / resized crop + flip), and
hand uint8 views to the device, where the strong view gets the paper's RandAugment + Cutout from
the shared batched tensor augmenter (`pipelines.randaugment_tensor`), then normalisation.

Every random choice comes from `pipelines.view_params` (a pure function of seed, epoch, index,
view): the Python feeder computes crop boxes and flips and passes them to DALI as per-sample
arguments, so the views are those of the `torch` backend (pad crops exactly; resized crops up to
DALI's resampling filter). Sources: ImageFolder trees are fed as encoded bytes (decoded by DALI);
array datasets (CIFAR, the demo) are fed as uint8 HWC arrays. Last-batch policy: training drops
the incomplete last batch (`pipeline.drop_last`) after the sampler has padded the epoch so every
rank runs the same number of steps; validation keeps a partial last batch and no padding.
"""
from __future__ import annotations

import collections
import logging
import os

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipelines.contract import Batch, Normalizer, ValBatch
from pipelines.host_views import strong_on_host, views_from_decoded
from pipelines.sampler import EpochSampler
from pipelines.sources import DataError, jpeg_hw, read_bytes
from pipelines.view_params import sample_views

log = logging.getLogger(__name__)


class _Feeder:
    """external_source callback (batch mode): encoded bytes or arrays plus per-sample view boxes."""

    def __init__(self, source, sampler, batch, data_cfg, pipe_cfg, seed, views, train, drop_last):
        self.source, self.sampler, self.batch, self.seed, self.views = source, sampler, batch, seed, views
        self.size, self.crop, self.pad = data_cfg.image_size, data_cfg.train_crop, data_cfg.crop_padding
        self.n_ops, self.strong_aug = pipe_cfg.randaug_n, pipe_cfg.strong_aug
        self.train, self.drop_last, self.val_resize = train, drop_last, data_cfg.val_resize
        self.encoded = hasattr(source, "files")
        self.skip_bad = getattr(source, "skip_bad", False)
        self.keys, self.pos, self.epoch = None, 0, 0
        self.recent = collections.deque(maxlen=8)  # file lists of recent batches, to name a bad file
        self._sizes, self._resolved = {}, {}
        self.params = {}  # (epoch, index) -> (weak Crop, strong Crop, StrongParams), read back by the loader
        self.boxes_in_graph = True
        self.roi_decode = False

    def start(self, epoch):
        self.epoch, self.keys, self.pos = epoch, None, 0
        self.params = {k: v for k, v in self.params.items() if k[0] >= epoch}

    def _size(self, i, raw=None):
        if i not in self._sizes:
            hw = jpeg_hw(raw) if raw is not None else None  # the header of bytes in hand, else PIL
            self._sizes[i] = hw if hw and hw[0] > 0 and hw[1] > 0 else self.source.size_of(i)
        return self._sizes[i]

    def _resolve(self, i):
        """Skip mode: the first readable sample from i on (the torch backend substitutes the same)."""
        if not (self.encoded and self.skip_bad):
            return i
        if i not in self._resolved:
            j = i
            for _ in range(len(self.source)):
                if _looks_decodable(read_bytes(self.source.files[j])):
                    break
                log.warning("skipping unreadable image: %s", self.source.files[j])
                j = (j + 1) % len(self.source)
            self._resolved[i] = j
        return self._resolved[i]

    def _data(self, i):
        if not self.encoded:
            return self.source.images[i]
        return read_bytes(self.source.files[i])

    def __call__(self):
        if self.keys is None:
            self.sampler.set_epoch(self.epoch)
            self.keys = [i for _, i in self.sampler]
        left = len(self.keys) - self.pos
        if left <= 0 or (self.drop_last and left < self.batch):
            raise StopIteration
        idx = self.keys[self.pos:self.pos + self.batch]
        self.pos += len(idx)
        src_idx = [self._resolve(i) for i in idx]
        if self.encoded:
            self.recent.append([self.source.files[j] for j in src_idx])
        # Fixed-shape fields go as one (N, ...) array each: DALI converts a list of per-sample arrays
        # element by element, which cost the main thread ~30 ms per 256-sample batch on a GPU machine.
        out = [[self._data(j) for j in src_idx],
               np.asarray([self.source.labels[j] for j in src_idx], dtype=np.int64).reshape(-1, 1),  # substitute's
               np.asarray(idx, dtype=np.int64).reshape(-1, 1)]
        if not self.train:
            if self.encoded:  # resize target and centre-crop anchor, rounded as the torch backend does
                geo = [_val_geometry(*self._size(j, raw), self.size, self.val_resize)
                       for j, raw in zip(src_idx, out[0])]
                out += [np.stack([g[0] for g in geo]), np.stack([g[1] for g in geo])]
            return out
        boxes = np.zeros((len(idx), 2, 4), dtype=np.float32)  # per view: top, left, height, width
        flips = np.zeros((len(idx), 2), dtype=np.int32)
        rois = np.zeros((len(idx), 2, 2), dtype=np.int32)  # anchor (y0, x0), shape (h, w)
        for n, (i, j, raw) in enumerate(zip(idx, src_idx, out[0])):
            h, w = self._size(j, raw if self.encoded else None)
            weak, strong, sp = sample_views(self.seed, self.epoch, i, h, w, crop=self.crop, size=self.size,
                                            pad=self.pad, n_ops=self.n_ops, strong_aug=self.strong_aug)
            if self.roi_decode:  # decode only the region both views need; boxes become ROI-relative
                y0, x0, y1, x1 = _roi(h, w, (weak, strong)[: self.views])
                rois[n] = (y0, x0), (y1 - y0, x1 - x0)
                weak, strong = (c._replace(top=c.top - y0, left=c.left - x0) for c in (weak, strong))
            self.params[(self.epoch, i)] = (weak, strong, sp)
            if self.boxes_in_graph:  # only DALI's own cropping reads the boxes; the host route reads params
                for k, c in enumerate((weak, strong)[: self.views]):
                    boxes[n, k] = c.top, c.left, c.height, c.width
                    flips[n, k] = c.flip
        if self.boxes_in_graph:
            return out + [a for k in range(self.views) for a in (boxes[:, k].copy(), flips[:, k].copy())]
        return out + [rois[:, 0].copy(), rois[:, 1].copy()] if self.roi_decode else out


def _roi(h, w, crops, align=16):
    """Union of the crop boxes inside the image, widened to the JPEG MCU grid so the region decode
    reproduces the full decode's pixels (chroma upsampling needs the neighbouring blocks)."""
    y0 = max(0, min(c.top for c in crops))
    x0 = max(0, min(c.left for c in crops))
    y1 = min(h, max(c.top + c.height for c in crops))
    x1 = min(w, max(c.left + c.width for c in crops))
    y0, x0 = max(0, y0 // align * align - align), max(0, x0 // align * align - align)
    y1, x1 = min(h, -(-y1 // align) * align + align), min(w, -(-x1 // align) * align + align)
    return y0, x0, y1, x1


def _val_geometry(h, w, size, resize):
    if resize:
        s = resize / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
    else:
        nw, nh = size, size
    return (np.array([nh, nw], dtype=np.float32),
            np.array([(nh - size) // 2, (nw - size) // 2], dtype=np.int32))


def _looks_decodable(raw: np.ndarray) -> bool:
    """Skip mode's test, once per file per run: whether PIL (the reference) decodes it. A JPEG is decoded
    at 1/8 scale (`draft`): the entropy decoding, where a corrupt file fails, runs in full, for about a
    fifth of a full decode (0.26 vs 1.4 ms at 500x375). A header check alone let a bad Huffman table
    through to DALI, which then stopped the run."""
    from io import BytesIO

    from PIL import Image
    try:
        with Image.open(BytesIO(raw.tobytes())) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        return False


def _view(img, box, flip, crop, size):
    anchor, shape = box[0:2], box[2:4]
    if crop == "pad":  # RandomCrop with zero padding: a slice that may leave the image
        v = fn.slice(img, anchor, shape, normalized_anchor=False, normalized_shape=False, axis_names="HW",
                     out_of_bounds_policy="pad", fill_values=0)
    else:
        v = fn.resize(img, roi_start=anchor, roi_end=anchor + shape, roi_relative=False, size=[size, size],
                      interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.flip(v, horizontal=flip)


# Decoders keep the stored orientation (adjust_orientation=False), as PIL and torchvision's loader do: the
# crop boxes are drawn from the stored size, and DALI's default would rotate by the EXIF tag.
@pipeline_def(enable_conditionals=False)
def _train_graph(feeder, decode_device, crop, size, views, encoded, roi, in_graph):
    """GPU: decode (nvJPEG) and cut both views in DALI. CPU: DALI decodes (its threads, no GIL) and the
    views are cut on the host with torch's resize, which measured ~4x faster than DALI's CPU resize."""
    n_extra = 2 * views if in_graph else (2 if roi else 0)
    outs = fn.external_source(source=feeder, num_outputs=3 + n_extra, batch=True,
                              layout=[None if encoded else "HWC"] + [None] * (2 + n_extra))
    data, label, index = outs[:3]
    if roi:  # CPU: decode only the union of the two crops (libjpeg-turbo skips the rest)
        img = fn.decoders.image_slice(data, outs[3], outs[4], normalized_anchor=False, normalized_shape=False,
                                      axis_names="HW", device="cpu", output_type=types.RGB,
                                      adjust_orientation=False)
    else:
        img = fn.decoders.image(data, device=decode_device, output_type=types.RGB,
                                adjust_orientation=False) if encoded else data
    if not in_graph:
        return img, label, index
    if not encoded and decode_device == "mixed":
        img = img.gpu()
    result = [_view(img, outs[3 + 2 * k], outs[4 + 2 * k], crop, size) for k in range(views)]
    return (*result, label, index)


@pipeline_def(enable_conditionals=False)
def _val_graph(feeder, decode_device, size, encoded):
    outs = fn.external_source(source=feeder, num_outputs=5 if encoded else 3, batch=True,
                              layout=[None if encoded else "HWC"] + [None] * (4 if encoded else 2))
    data, label, index = outs[:3]
    if encoded:
        img = fn.decoders.image(data, device=decode_device, output_type=types.RGB, adjust_orientation=False)
        img = fn.resize(img, size=outs[3], interp_type=types.INTERP_LINEAR, antialias=True)
        img = fn.slice(img, outs[4], [size, size], normalized_anchor=False, normalized_shape=False,
                       axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    else:  # array datasets are validated at their native size
        img = data.gpu() if decode_device == "mixed" else data
    return img, label, index


def decode_device_for(pipe_cfg, device: torch.device) -> str:
    want = pipe_cfg.dali_device
    if want == "gpu" and device.type != "cuda":
        from training.runtime import RuntimeConfigError
        raise RuntimeConfigError("pipeline.dali_device=gpu needs the training device to be CUDA "
                                 "(use pipeline.dali_device=cpu or auto)")
    return "mixed" if (want == "gpu" or (want == "auto" and device.type == "cuda")) else "cpu"


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    from nvidia.dali.tensors import TensorListGPU
    if isinstance(tl, TensorListGPU):  # stays on the GPU: DALI's buffer -> a torch tensor, no host trip
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(tl.as_array()).to(device, non_blocking=True)


class _DaliLoader:
    def __init__(self, feeder, pipe, steps, normalize, kind, cfg, views):
        self.feeder, self.pipe, self.steps, self.normalize, self.kind = feeder, pipe, steps, normalize, kind
        self.cfg, self.views = cfg, views
        self.epoch, self._live = 0, None

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.steps

    def _run(self):
        try:
            return self.pipe.run()
        except StopIteration:
            raise
        except RuntimeError as e:
            raise _translate(e, self.feeder) from None

    def _abandon(self):
        """An iteration left early (a `break`): end the feeder's epoch and drain the batches DALI has
        already prefetched, else the next iteration would start with them (another epoch's views)."""
        self.feeder.keys, self.feeder.pos, self._live = [], 0, None
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            self.pipe.reset()
        except Exception as e:  # noqa: BLE001 - may run during garbage collection: never raise there
            log.warning("DALI pipeline could not be drained after an early stop: %s", str(e).splitlines()[0])

    def __iter__(self):
        if self._live is not None:  # an earlier iterator still open (held, not closed): end it first
            self._abandon()
        me = self._live = object()
        try:
            yield from self._batches()
            self._live = None
        except GeneratorExit:
            if self._live is me:  # a stale iterator closed later must not end the current one
                self._abandon()
            raise
        except BaseException:
            self._live = None  # the error ended this epoch; nothing left to drain
            raise

    def _batches(self):
        self.feeder.start(self.epoch)
        dev = self.normalize.device
        while True:
            try:
                outs = self._run()
            except StopIteration:
                self.pipe.reset()
                return
            label = torch.from_numpy(np.array(outs[-2].as_array()).reshape(-1))  # copies: DALI reuses buffers
            index_cpu = torch.from_numpy(np.array(outs[-1].as_array()).reshape(-1))
            y, i = label.to(dev, non_blocking=True), index_cpu.to(dev, non_blocking=True)
            if self.kind == "val":
                yield ValBatch(self.normalize(_to_torch(outs[0], dev)), y, i)
                continue
            params = [self.feeder.params[(self.epoch, k)] for k in index_cpu.tolist()]
            if self.feeder.boxes_in_graph:  # views cut by DALI on the GPU; strong aug as batched tensor ops
                weak, s = _to_torch(outs[0], dev), (_to_torch(outs[1], dev) if self.views == 2 else None)
                if s is not None:
                    s = strong_on_host(s, [p[2] for p in params], dev, self.cfg.pipeline.strong_aug)
                yield Batch(self.normalize(weak), None if s is None else self.normalize(s), y, i, index_cpu)
            else:  # CPU decode: views cut on the host (pipelines.host_views)
                weak, s = views_from_decoded([np.asarray(im) for im in outs[0]], params, self.cfg.data.image_size,
                                             self.views, self.normalize, self.cfg.pipeline.host_threads)
                yield Batch(weak, s, y, i, index_cpu)


def _translate(e: RuntimeError, feeder) -> DataError:
    """DALI reports decoder failures without our file names: find the culprit in recent batches."""
    from PIL import Image
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    after = [lines[k + 1] for k, ln in enumerate(lines[:-1]) if ln == "encountered:"]
    first = after[0] if after else next((ln for ln in lines if "Critical error" not in ln), type(e).__name__)
    for files in reversed(feeder.recent):
        for path in files:
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as pe:
                return DataError(f"{path}: cannot decode image ({type(pe).__name__}: {pe}; DALI: {first[:200]})")
    return DataError(f"DALI pipeline failed: {first[:300]}")


def _threads(pipe_cfg):
    return pipe_cfg.dali_threads or max(1, os.cpu_count() or 1)


def _views_in_graph(decode_device: str) -> bool:
    """Who cuts the views: DALI on a GPU; the host on a CPU (tests run the DALI path on a CPU too)."""
    return decode_device == "mixed"


def _build(source, cfg, device, rank, world, train, views):
    pc = cfg.pipeline
    dec = decode_device_for(pc, device)
    batch = pc.batch_size // world if train else pc.val_batch_size
    sampler = EpochSampler(len(source), seed=cfg.run.seed if train else 0, shuffle=train, rank=rank,
                           world=world, pad=train)
    drop_last = train and pc.drop_last
    feeder = _Feeder(source, sampler, batch, cfg.data, pc, cfg.run.seed, views, train, drop_last)
    feeder.boxes_in_graph = _views_in_graph(dec)
    feeder.roi_decode = train and feeder.encoded and not feeder.boxes_in_graph
    kw = dict(batch_size=batch, num_threads=_threads(pc), device_id=device.index if dec == "mixed" else None,
              prefetch_queue_depth=pc.prefetch, seed=cfg.run.seed, exec_dynamic=True)
    if train:
        pipe = _train_graph(feeder, dec, cfg.data.train_crop, cfg.data.image_size, views, feeder.encoded,
                            feeder.roi_decode, feeder.boxes_in_graph, **kw)
    else:
        pipe = _val_graph(feeder, dec, cfg.data.image_size, feeder.encoded, **kw)
    pipe.build()
    n = len(sampler)
    steps = n // batch if drop_last else -(-n // batch)
    norm = Normalizer.for_run(source.mean_std, cfg, device)
    return _DaliLoader(feeder, pipe, steps, norm, "train" if train else "val", cfg, views)


def build_train(source, cfg, device, rank: int = 0, world: int = 1, views: int = 2):
    return _build(source, cfg, device, rank, world, True, views)


def build_val(source, cfg, device, rank: int = 0, world: int = 1):
    return _build(source, cfg, device, rank, world, False, 1)
