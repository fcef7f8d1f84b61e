"""Batches prepared one step ahead on a side stream, without host synchronisation.

On CUDA every loader is wrapped: batch k+1's device work (its copies, crops, strong augmentation and
normalisation) is enqueued on a side stream before batch k is handed to the training step, and the
step's stream waits for it through an event, never the host. The side stream in turn waits for the
step's stream as far as it is enqueued before each batch (batch k+1 after step k-1), so loader work
never reads what the step's stream has not written yet. The step's own kernels thus do not queue
behind loader kernels, and the loader's work overlaps the step on the device. Tensors made on the side
stream are recorded on the step's stream, so the caching allocator does not hand their memory out again
while the step still reads them. On a CPU there are no streams: the wrapper passes batches through.
"""
from __future__ import annotations

import torch


class CudaStreams:
    """The stream operations the prefetcher needs (a class of its own so that tests can record them)."""

    def __init__(self, device: torch.device):
        self.side = torch.cuda.Stream(device)
        self.device = device

    def side_waits_for_main(self):
        """Called on the step's stream, before the side stream's next work: what the loader reads there
        may have been written on the step's stream (its buffers, tensors made outside the side stream,
        reused memory), and a stream orders nothing against another by itself."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))

    def on_side(self):
        return torch.cuda.stream(self.side)

    def mark_ready(self):
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def hand_over(self, event, tensors):
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)
        for t in tensors:
            t.record_stream(main)


class Prefetched:
    """A loader whose batches are prepared one ahead (see the module docstring); everything else (len,
    set_epoch, attributes) is the wrapped loader's."""

    def __init__(self, loader, streams):
        self.loader, self.streams = loader, streams

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int, start: int = 0):
        self.loader.set_epoch(epoch, start)

    def _fetch(self, it):
        self.streams.side_waits_for_main()
        with self.streams.on_side():
            batch = next(it, None)
        return None if batch is None else (batch, self.streams.mark_ready())

    def __iter__(self):
        it = iter(self.loader)
        try:
            ahead = self._fetch(it)
            while ahead is not None:
                batch, ready = ahead
                ahead = self._fetch(it)
                self.streams.hand_over(ready, [t for t in batch if isinstance(t, torch.Tensor) and t.is_cuda])
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:  # an iteration left early: the loader drains what it has in flight
                close()


def prefetched(loader, device):
    device = torch.device(device)
    return Prefetched(loader, CudaStreams(device)) if device.type == "cuda" else loader
