"""`ffcv`: FFCV backend reading `.beton` files written by `datasets_prep/prep_ffcv.py`.

Files: `<pipeline.ffcv_dir or data.root/ffcv>/train.beton` and `val.beton`, each with its JSON sidecar,
checked against the config before training (class count, dataset, byte size).

Each image is decoded once inside FFCV's compiled pipeline. Padded crops (CIFAR, demo): a custom
decoder (`TwoViewDecoder`) also cuts both views there (crop + flip), from boxes that are not drawn
inside FFCV but come from `pipelines.view_params` (a pure function of seed, epoch, index, view),
computed per epoch in Python (the next epoch's in the background) and read through a shared table.
Resized crops (ImageNet-style): `DecodeOnceDecoder` hands the decoded image over and the host cuts both
views with torch's antialiased resize (`pipelines.finish_views`). Either way the views are replayable and
equal to the other backends' boxes. The strong view then gets RandAugment + Cutout (PIL on a CPU, the
batched tensor augmenter on a GPU) and both are normalised on the device.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace

import numba
import numpy as np
import torch
from PIL import Image
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.fields.basics import IntDecoder
from numba.core import cgutils
from numba.core import types as nbtypes
from numba.extending import intrinsic

from pipelines import cpu_plan
from pipelines.contract import Batch, ValBatch
from pipelines.device import Normalizer, to_device
from pipelines.finish_views import crop_pairs, pair_finisher, pool, views_from_decoded
from pipelines.randaugment_graph import strong_program
from pipelines.sources import DataError
from pipelines.splits import beton_paths, check_sidecar
from pipelines.upsample import resized_hw, val_view_pil
from pipelines.view_params import ViewBatch, draw_views, run_strong_draws

log = logging.getLogger(__name__)


@intrinsic
def _as_pointer(typingctx, addr):
    """int -> void*: lets compiled code read a numpy buffer that Python refills every epoch
    (numba would otherwise freeze a captured array as a compile-time constant)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return nbtypes.voidptr(addr), codegen


# Compiled FFCV helpers are kept for the life of the process: when one is garbage-collected with
# its loader, numba's dispatcher finaliser prints a spurious 'Exception ignored ... KeyError'.
_KEEP_ALIVE = []


class ViewTable:
    """View boxes per sample. With compiled crops (`crops_in_pipeline`) an epoch's boxes are written ahead
    into one of two buffers (n, 2 views, [top, left, height, width, flip]) that the compiled decoder reads,
    picked by `parity`; while an epoch runs, a thread fills the other buffer for the next one, so an epoch
    boundary waits for nothing. Otherwise the boxes are drawn per batch for the host, which cuts the views.
    Either way a batch's or an epoch's boxes are one vectorised draw (`view_params.draw_views`)."""

    def __init__(self, metadata, data_cfg, seed, crops_in_pipeline: bool):
        self.hw = np.stack([metadata["height"], metadata["width"]], 1).astype(np.int64)  # as stored
        n = len(self.hw)
        # the boxes are drawn in the resized image (`data.resize_source`), which the host makes after the decode
        self.view_hw = resized_hw(self.hw, data_cfg.resize_source) if data_cfg.resize_source else self.hw
        self.tables = np.zeros((2, n, 2, 5), dtype=np.int32)
        self.parity = np.zeros(1, dtype=np.int64)  # the buffer the compiled decoder reads
        self.decodes = np.zeros(n, dtype=np.int64)  # decodes per sample (tests count them)
        self.crops_in_pipeline, self.seed = crops_in_pipeline, seed
        self.view_kw = dict(crop=data_cfg.train_crop, size=data_cfg.image_size, pad=data_cfg.crop_padding,
                            strong_aug=False)  # the strong parameters: `strong_draws` from the indices
        self.filled = [None, None]  # epoch held by each buffer
        self._ahead = None  # (epoch, thread) filling the next epoch's buffer

    def boxes(self, epoch, indices) -> np.ndarray:
        """(N, 2, 5) boxes of both views of `indices` (int64 array) in `epoch`."""
        return draw_views(self.seed, epoch, indices, self.view_hw[indices], **self.view_kw).boxes

    def _fill(self, epoch, indices):
        b = epoch % 2
        self.filled[b] = None
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices):
            self.tables[b][indices] = self.boxes(epoch, indices)
        self.filled[b] = epoch

    def start(self, epoch, indices, next_indices=None):
        """Before `epoch` runs: its boxes in place (drawn now unless filled ahead); then the next epoch's
        drawn in the background into the other buffer, which no compiled code reads meanwhile."""
        if not self.crops_in_pipeline:
            return
        if self._ahead is not None:
            self._ahead[1].join()
            self._ahead = None
        if self.filled[epoch % 2] != epoch:
            self._fill(epoch, indices)
        self.parity[0] = epoch % 2
        if next_indices is not None:
            t = threading.Thread(target=self._fill, args=(epoch + 1, next_indices), daemon=True,
                                 name="ffcv-views-ahead")
            t.start()
            self._ahead = (epoch + 1, t)


class TwoViewDecoder(SimpleRGBImageDecoder):  # FFCV takes a field's first op as its decoder by type
    """Decode once (JPEG via libjpeg-turbo, or raw), then both views; output (2, S, S, 3) uint8."""

    def __init__(self, size: int, table: ViewTable):
        super().__init__()
        self.size, self.views = size, table

    def declare_state_and_memory(self, previous_state):
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        shape = (2, self.size, self.size, 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")),
                (AllocationQuery(shape, np.dtype("u1")), AllocationQuery((max_pixels * np.uint64(3),), np.dtype("u1"))))

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        _KEEP_ALIVE.append((imdecode_c, resize_crop_c))
        addr, n, size = self.views.tables.ctypes.data, self.views.tables.shape[1], self.size
        parity_addr = self.views.parity.ctypes.data
        count_addr = self.views.decodes.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            table = numba.carray(_as_pointer(addr), (2, n, 2, 5), np.int32)[
                numba.carray(_as_pointer(parity_addr), (1,), np.int64)[0]]
            decodes = numba.carray(_as_pointer(count_addr), (n,), np.int64)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                decodes[source_ix] += 1  # indices within a batch are distinct: no race
                if field["mode"] == jpg:
                    temp = temp_storage[dst_ix]
                    h32, w32 = np.uint32(field["height"]), np.uint32(field["width"])  # the C signature's types
                    imdecode_c(image_data, temp, h32, w32, h32, w32, 0, 0, 1, 1, False, False)
                    img = temp.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    img = image_data.reshape(height, width, 3)
                for v in range(2):
                    top, left, h, w, flip = table[source_ix, v, 0], table[source_ix, v, 1], \
                        table[source_ix, v, 2], table[source_ix, v, 3], table[source_ix, v, 4]
                    out = destination[dst_ix, v]
                    if h == size and w == size:  # RandomCrop with zero padding
                        out[:] = 0
                        y0, x0 = max(top, 0), max(left, 0)
                        y1, x1 = min(top + h, height), min(left + w, width)
                        if y1 > y0 and x1 > x0:
                            out[y0 - top:y1 - top, x0 - left:x1 - left] = img[y0:y1, x0:x1]
                    else:
                        resize_crop_c(img, top, top + h, left, left + w, out)
                    if flip:
                        for r in range(size):
                            for c in range(size // 2):
                                for ch in range(3):
                                    t = out[r, c, ch]
                                    out[r, c, ch] = out[r, size - 1 - c, ch]
                                    out[r, size - 1 - c, ch] = t
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class DecodeOnceDecoder(SimpleRGBImageDecoder):
    """Decode once (JPEG via libjpeg-turbo, or raw), nothing else: output the full image, flattened
    into a (max_pixels * 3,) uint8 slot. The host cuts both views with torch's antialiased resize,
    cheaper than the OpenCV INTER_AREA resize FFCV's compiled ops use (docs/benchmarks.md)."""

    def __init__(self, table: ViewTable):
        super().__init__()
        self.views = table

    def declare_state_and_memory(self, previous_state):
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        shape = (int(max_pixels) * 3,)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")), \
            AllocationQuery(shape, np.dtype("u1"))

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        _KEEP_ALIVE.append(imdecode_c)
        count_addr, n = self.views.decodes.ctypes.data, len(self.views.decodes)

        def decode(batch_indices, destination, metadata, storage_state):
            decodes = numba.carray(_as_pointer(count_addr), (n,), np.int64)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                decodes[source_ix] += 1  # indices within a batch are distinct: no race
                if field["mode"] == jpg:
                    h32, w32 = np.uint32(field["height"]), np.uint32(field["width"])  # the C signature's types
                    imdecode_c(image_data, destination[dst_ix], h32, w32, h32, w32, 0, 0, 1, 1, False, False)
                else:
                    npix = 3 * np.int64(field["height"]) * np.int64(field["width"])
                    destination[dst_ix, :npix] = image_data[:npix]
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class LabelIndexDecoder(IntDecoder):
    """Label field -> (label, sample index); the index is the sample's position in the .beton,
    i.e. the source's canonical order (FFCV 1.0.2 cannot map one field to two pipelines)."""

    def declare_state_and_memory(self, previous_state):
        return (replace(previous_state, jit_mode=True, shape=(2,), dtype=np.dtype("<i8")),
                AllocationQuery((2,), np.dtype("<i8")))

    def generate_code(self):
        def decode(indices, destination, metadata, storage_state):
            for ix in range(len(indices)):
                destination[ix, 0] = metadata[indices[ix]]
                destination[ix, 1] = indices[ix]
            return destination[:len(indices)]
        return decode


class _FfcvLoader:
    def __init__(self, loader, normalize):
        self.loader, self.normalize, self.epoch, self.start = loader, normalize, 0, 0

    def set_epoch(self, epoch, start: int = 0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(self.loader)

    def _epoch(self):
        """This epoch's (uint8 data, label on the device, index on the device, index on the host)."""
        dev = self.normalize.device
        self.loader.next_epoch = self.epoch  # FFCV's order for this epoch (seeded shuffle)
        for data, label_index in self.loader:
            li = torch.from_numpy(np.array(label_index, dtype=np.int64))  # copy: FFCV reuses its slots
            yield torch.from_numpy(np.asarray(data)), to_device(li[:, 0], dev), to_device(li[:, 1], dev), li[:, 1]


class _FfcvTrainLoader(_FfcvLoader):
    def __init__(self, loader, table, normalize, cfg, views, device_route, host_threads):
        super().__init__(loader, normalize)
        self.table, self.cfg, self.views, self.host_threads = table, cfg, views, host_threads
        # where the views are cut and how they are finished, fixed when the loader is built
        self._finish = pair_finisher(device_route, host_threads, strong_program(cfg.pipeline.strong_program))
        self._views = (self._compiled_views if table.crops_in_pipeline else
                       self._resized_on_device if device_route else self._views_on_host)

    def _compiled_views(self, x, idx_cpu, strong):
        """Both views cut in FFCV's compiled decoder: (N, 2, S, S, 3) uint8."""
        return self._finish(x, strong, self.normalize, self.views)

    def _decoded(self, x, idx):
        return [x[j, :3 * h * w].view(h, w, 3).numpy() for j, (h, w) in enumerate(self.table.hw[idx].tolist())]

    def _views_on_host(self, x, idx_cpu, strong):
        """Host route: the decoded images, cut per sample on the host pool."""
        idx = idx_cpu.numpy()
        return views_from_decoded(self._decoded(x, idx), ViewBatch(self.table.boxes(self.epoch, idx), strong),
                                  self.cfg.data.image_size, self.views, self.normalize, self.host_threads,
                                  self.cfg.data.resize_source)

    def _resized_on_device(self, x, idx_cpu, strong):
        """Device route with `data.resize_source`: resized and cut on the host pool (PIL's filter, which
        FFCV's compiled resize does not reproduce), finished on the device."""
        idx, dc = idx_cpu.numpy(), self.cfg.data
        pairs = crop_pairs(self._decoded(x, idx), ViewBatch(self.table.boxes(self.epoch, idx), None),
                           dc.image_size, dc.resize_source, self.host_threads)
        return self._finish(pairs, strong, self.normalize, self.views)

    def __iter__(self):
        # only this rank's samples of this epoch (FFCV's own order, sharded when distributed)
        order = self.loader.traversal_order.sample_order
        self.table.start(self.epoch, order(self.epoch), order(self.epoch + 1))
        for b, (x, y, i, idx_cpu) in enumerate(self._epoch()):
            if b < self.start:  # FFCV's order cannot start mid-epoch: the first batches are decoded, not used
                continue
            strong = run_strong_draws(self.cfg, self.epoch, idx_cpu.numpy(), self.views)
            yield Batch(*self._views(x, idx_cpu, strong), y, i, idx_cpu)


class _FfcvValLoader(_FfcvLoader):
    def __init__(self, loader, normalize, host_threads, keep=None, resized=None):
        super().__init__(loader, normalize)
        self.keep = keep  # this rank's real validation samples (positions rank, rank + world, ...)
        self.resized = resized  # (stored sizes, data.resize_source, data.image_size): views made on the host
        self.host_threads = host_threads

    def _val_views(self, x, idx):
        """`data.resize_source`: each decoded image through the reference's validation transform."""
        hw, s, size = self.resized
        out = torch.empty((len(idx), size, size, 3), dtype=torch.uint8)

        def one(j):
            h, w = hw[idx[j]].tolist()
            img = Image.fromarray(x[j, :3 * h * w].view(h, w, 3).numpy())
            out[j] = torch.from_numpy(np.asarray(val_view_pil(img, s, size)))
        list(pool(self.host_threads).map(one, range(len(idx))))
        return out

    def __iter__(self):
        left = self.keep
        for x, y, i, i_cpu in self._epoch():
            if self.resized is not None:
                x = self._val_views(x, i_cpu.numpy())
            if left is not None:  # drop the DistributedSampler's padding: no sample counted twice
                n, left = max(0, min(len(y), left)), left - len(y)
                x, y, i = x[:n], y[:n], i[:n]
                if n == 0:
                    continue
            yield ValBatch(self.normalize(x), y, i)


def _loader(path, cfg, batch, image_pipe, train, world, workers):
    pc = cfg.pipeline
    quasi = train and pc.ffcv_order == "quasi_random"
    if quasi and world > 1:
        raise DataError(f"pipeline.ffcv_order=quasi_random: FFCV 1.0.2 has no distributed QUASI_RANDOM order "
                        f"({world} processes); use pipeline.ffcv_order=random")
    if quasi and pc.ffcv_os_cache:
        log.warning("pipeline.ffcv_order=quasi_random pays off with pipeline.ffcv_os_cache=false (datasets larger "
                    "than memory); over the OS page cache it only costs randomness")
    order = OrderOption.QUASI_RANDOM if quasi else OrderOption.RANDOM
    return Loader(path, batch_size=batch, num_workers=workers,
                  order=order if train else OrderOption.SEQUENTIAL, os_cache=pc.ffcv_os_cache,
                  distributed=world > 1, seed=cfg.run.seed, drop_last=train and pc.drop_last,
                  pipelines={"image": image_pipe, "label": [LabelIndexDecoder()]})


def build_train(source, cfg, device, rank: int = 0, world: int = 1, views: int = 2, *, device_route: bool):
    if cfg.data.subset:
        raise DataError("data.subset is not supported by the ffcv pipeline: convert the subset instead")
    path = beton_paths(cfg)[0]
    meta = check_sidecar(path, cfg, source, "train")
    from ffcv.reader import Reader
    reader = Reader(path)
    # Both views are cut in FFCV's compiled decoder on the accelerator route, and for padded crops (cheap
    # slices) on either. Resized crops on the host route: decoded in FFCV, resized on the host with torch's
    # antialiased filter, closer to the reference's PIL resize and cheaper than FFCV's OpenCV INTER_AREA
    # resize on a CPU (docs/benchmarks.md).
    # A resized source (`data.resize_source`) is resized on the host after FFCV's decode, on either route.
    compiled = (device_route or cfg.data.train_crop == "pad") and not cfg.data.resize_source
    table = ViewTable(reader.metadata["f0"], cfg.data, cfg.run.seed, compiled)
    decoder = TwoViewDecoder(cfg.data.image_size, table) if compiled else DecodeOnceDecoder(table)
    plan = cpu_plan(cfg, device)
    loader = _loader(path, cfg, cfg.pipeline.batch_size // world, [decoder], True, world, plan.workers)
    return _FfcvTrainLoader(loader, table, Normalizer.for_run(meta["mean_std"], cfg, device), cfg, views, device_route,
                            plan.host_threads)


def build_val(source, cfg, device, rank: int = 0, world: int = 1, *, device_route: bool):
    path = beton_paths(cfg)[1]
    meta = check_sidecar(path, cfg, source, "val")
    size, resize, resize_source = cfg.data.image_size, cfg.data.val_resize, cfg.data.resize_source
    resized = None
    if resize_source:  # decoded whole, resized on the host: the reference's bicubic filter
        from ffcv.reader import Reader
        table = ViewTable(Reader(path).metadata["f0"], cfg.data, 0, False)
        dec, resized = DecodeOnceDecoder(table), (table.hw, resize_source, size)
    elif resize:
        dec = CenterCropRGBImageDecoder((size, size), ratio=size / resize)
    else:
        dec = SimpleRGBImageDecoder()
    plan = cpu_plan(cfg, device)
    loader = _loader(path, cfg, cfg.pipeline.val_batch_size, [dec], False, world, plan.workers)
    return _FfcvValLoader(loader, Normalizer.for_run(meta["mean_std"], cfg, device), plan.host_threads,
                          keep=len(range(rank, meta["num_samples"], world)) if world > 1 else None, resized=resized)
