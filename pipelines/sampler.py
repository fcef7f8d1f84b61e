"""Epoch-keyed shuffling and rank sharding shared by the backends.

The order of epoch e is a pure function of (seed, e); rank r of W takes every W-th element, and
the epoch is padded by wrapping (training) so every rank has the same number of samples.
The sampler yields (epoch, index) keys so that dataset workers know the epoch without state.
"""
import torch
from torch.utils.data import Sampler


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=g)


class EpochSampler(Sampler):
    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1, pad: bool = True):
        self.n, self.seed, self.shuffle, self.rank, self.world, self.pad = n, seed, shuffle, rank, world, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        """`skip`: leave out the rank's first `skip` samples when iterated (a run resumed mid-epoch);
        `indices()` stays the whole epoch."""
        self.epoch, self.skip = epoch, skip

    def indices(self):
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        if self.pad and self.n % self.world:
            order = torch.cat([order, order[: self.world - self.n % self.world]])
        return order[self.rank::self.world].tolist()

    def __len__(self):
        n = -(-self.n // self.world) if self.pad else len(range(self.rank, self.n, self.world))
        return max(0, n - self.skip)

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices()[self.skip:]])
