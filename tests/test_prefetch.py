"""Batches prepared one step ahead: the order of stream operations, checked with recording streams (the
CUDA streams themselves need a GPU; bench/gpu_run.sh runs the real ones)."""
import contextlib

import torch

from pipelines.contract import Batch
from pipelines.prefetch import Prefetched, prefetched


class RecordingStreams:
    def __init__(self, log):
        self.log, self.inside = log, False

    def side_waits_for_main(self):
        # a wait issued from inside the side stream's context would make the side stream wait for itself
        assert not self.inside, "the side stream must wait for the step's stream, not its own"
        self.log.append("side_waits")

    @contextlib.contextmanager
    def on_side(self):
        self.inside = True
        yield
        self.inside = False

    def mark_ready(self):
        self.log.append("ready")
        return len([e for e in self.log if e == "ready"]) - 1

    def hand_over(self, event, tensors):
        self.log.append(("hand_over", event, len(tensors)))


class Loader:
    def __init__(self, n, log, streams=None):
        self.n, self.log, self.streams, self.epoch, self.closed = n, log, streams, None, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch

    def __iter__(self):
        try:
            for k in range(self.n):
                assert self.streams is None or self.streams.inside, "loader work must run on the side stream"
                self.log.append(("made", k))
                x = torch.full((2, 3), float(k))
                yield Batch(x, None, torch.tensor([k, k]), torch.tensor([0, 1]), torch.tensor([0, 1]))
        finally:
            self.closed += 1


def run(n, stop=None):
    log = []
    streams = RecordingStreams(log)
    loader = Loader(n, log, streams)
    wrapped = Prefetched(loader, streams)
    got = []
    for b in wrapped:
        log.append(("step", int(b.weak[0, 0])))
        got.append(int(b.target[0]))
        if stop is not None and len(got) == stop:
            break
    return log, got, loader


def test_the_next_batch_is_enqueued_before_the_step_and_handed_over_by_event():
    """Before each batch's work the side stream waits for the step's stream (what it has enqueued so far:
    the loader may read buffers written there), and the end of the epoch is a fetch too."""
    log, got, _ = run(3)
    assert got == [0, 1, 2]
    assert log == ["side_waits", ("made", 0), "ready", "side_waits", ("made", 1), "ready", ("hand_over", 0, 0),
                   ("step", 0), "side_waits", ("made", 2), "ready", ("hand_over", 1, 0), ("step", 1),
                   "side_waits", ("hand_over", 2, 0), ("step", 2)]


def test_an_early_stop_closes_the_loaders_iteration():
    _, got, loader = run(5, stop=2)
    assert got == [0, 1] and loader.closed == 1  # (the dali loader drains its prefetched batches on close)


def test_length_epoch_and_attributes_are_the_wrapped_loaders():
    loader = Loader(4, [])
    wrapped = Prefetched(loader, RecordingStreams([]))
    wrapped.set_epoch(7)
    assert len(wrapped) == 4 and loader.epoch == 7 and wrapped.n == 4
    assert prefetched(loader, "cpu") is loader  # no streams on a CPU
