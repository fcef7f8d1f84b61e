"""`torch`: the reference two-view backend (PyTorch DataLoader + PIL), and the speed baseline.

Each sample is decoded once; the weak view (crop + flip) and the strong view (its own crop + flip,
then the paper's RandAugment + Cutout) are made from that decode with parameters from
`pipelines.view_params`, so views are a pure function of (seed, epoch, index, view).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.forking import fork_safely
from pipelines import cpu_plan
from pipelines.contract import Batch, ValBatch
from pipelines.device import Normalizer
from pipelines.randaugment_pil import apply_strong
from pipelines.sampler import EpochSampler
from pipelines.upsample import resize_pil, val_view_pil
from pipelines.view_params import STRONG, WEAK, Crop, draw_views


def apply_crop(img: Image.Image, c: Crop, size: int) -> Image.Image:
    box = (c.left, c.top, c.left + c.width, c.top + c.height)
    if c.height == size and c.width == size:
        out = img.crop(box)  # PIL fills outside the image with zeros == RandomCrop's zero padding
    else:  # crop, then resize: torchvision's resized_crop (resize(box=) would filter across the box edge)
        out = img.crop(box).resize((size, size), Image.BILINEAR)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if c.flip else out


class TwoViewDataset(Dataset):
    """Item key is (epoch, index) so persistent workers need no epoch broadcast. A worker fetches a whole
    batch at once (`__getitems__`): the batch's view parameters are one vectorised draw."""

    def __init__(self, source, data_cfg, pipe_cfg, seed: int, views: int = 2):
        self.source, self.seed, self.views = source, seed, views
        self.size, self.resize = data_cfg.image_size, data_cfg.resize_source
        self.view_kw = dict(crop=data_cfg.train_crop, size=data_cfg.image_size, pad=data_cfg.crop_padding,
                            n_ops=pipe_cfg.randaug_n, strong_aug=pipe_cfg.strong_aug and views == 2)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        samples = [self.source.load_sample(index) for _, index in keys]
        if self.resize:  # before the boxes are drawn: they are drawn with the resized sizes
            samples = [(resize_pil(img, self.resize), label) for img, label in samples]
        index = np.array([i for _, i in keys], dtype=np.int64)
        hw = np.array([(img.size[1], img.size[0]) for img, _ in samples], dtype=np.int64)
        vb = draw_views(self.seed, keys[0][0], index, hw, **self.view_kw)  # a batch is one epoch's
        out = []
        for j, (img, label) in enumerate(samples):
            weak = np.asarray(apply_crop(img, vb.crop(j, WEAK), self.size))
            if self.views == 1:
                out.append((weak, label, int(index[j])))
                continue
            strong = apply_crop(img, vb.crop(j, STRONG), self.size)
            if vb.strong is not None:
                strong = apply_strong(strong, vb.strong.params(j))
            out.append((weak, np.asarray(strong), label, int(index[j])))
        return out


class ValDataset(Dataset):
    def __init__(self, source, data_cfg):
        self.source, self.size, self.resize = source, data_cfg.image_size, data_cfg.val_resize
        self.resize_source = data_cfg.resize_source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        _, index = key
        img, label = self.source.load_sample(index)
        if self.resize_source:
            img = val_view_pil(img, self.resize_source, self.size)
        elif self.resize:  # resize shorter side, then centre crop (ImageNet protocol)
            w, h = img.size
            s = self.resize / min(w, h)
            img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        elif img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(img), label, index


def _collate(items):
    cols = list(zip(*items))
    out = [torch.from_numpy(np.stack(c)) if isinstance(c[0], np.ndarray) else torch.as_tensor(c)
           for c in cols]
    return out


class _DeviceLoader:
    """Wraps a DataLoader: uint8 host batches -> contract batches on the device."""

    def __init__(self, loader, sampler, normalize):
        self.loader, self.sampler, self.normalize = loader, sampler, normalize

    def set_epoch(self, epoch: int, start: int = 0):
        self.sampler.set_epoch(epoch, skip=start * self.loader.batch_size)

    def __len__(self):
        return len(self.loader)

    def _host_batches(self):
        """The DataLoader's iterator; its worker processes (started here, once) fork safely."""
        if self.loader.num_workers == 0:
            return iter(self.loader)
        with fork_safely():
            return iter(self.loader)


class _TrainLoader(_DeviceLoader):
    def __iter__(self):
        dev = self.normalize.device
        for cols in self._host_batches():
            w, s, y, i = cols if len(cols) == 4 else (cols[0], None, *cols[1:])  # single view: no strong column
            yield Batch(self.normalize(w), None if s is None else self.normalize(s),
                        y.to(dev, non_blocking=True), i.to(dev, non_blocking=True), i)


class _ValLoader(_DeviceLoader):
    def __iter__(self):
        dev = self.normalize.device
        for x, y, i in self._host_batches():
            yield ValBatch(self.normalize(x), y.to(dev, non_blocking=True), i.to(dev, non_blocking=True))


def _loader(dataset, sampler, cfg, device, per_rank_batch, drop_last, seed):
    workers = cpu_plan(cfg, device).workers
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=workers,
                      collate_fn=_collate, pin_memory=torch.device(device).type == "cuda",
                      drop_last=drop_last, persistent_workers=workers > 0, generator=g,
                      prefetch_factor=4 if workers > 0 else None)


def build_train(source, cfg, device, rank: int = 0, world: int = 1, views: int = 2, *, device_route: bool):
    # no route: DataLoader workers cut and augment every view (the reference)
    per_rank = cfg.pipeline.batch_size // world
    sampler = EpochSampler(len(source), seed=cfg.run.seed, shuffle=True, rank=rank, world=world)
    ds = TwoViewDataset(source, cfg.data, cfg.pipeline, cfg.run.seed, views)
    dl = _loader(ds, sampler, cfg, device, per_rank, cfg.pipeline.drop_last, cfg.run.seed)
    return _TrainLoader(dl, sampler, Normalizer.for_run(source.mean_std, cfg, device))


def build_val(source, cfg, device, rank: int = 0, world: int = 1, *, device_route: bool):
    sampler = EpochSampler(len(source), seed=0, shuffle=False, rank=rank, world=world, pad=False)
    dl = _loader(ValDataset(source, cfg.data), sampler, cfg, device,
                 cfg.pipeline.val_batch_size, False, 0)
    return _ValLoader(dl, sampler, Normalizer.for_run(source.mean_std, cfg, device))
