"""FFCV's DatasetWriter with worker failures surfaced instead of a hang.

FFCV 1.0.2's `_write_common` waits for a shared "samples done" counter and then for one allocation
list per worker; a worker that dies (a full disk while it flushes a page: ENOSPC, or SIGBUS on a
mapped page) stops both, and the parent waits forever. This subclass runs the same steps and checks
the workers' exit codes while it waits, so `prep_ffcv.py` can remove its temp file and say why; and it forks
them safely after DALI has run in this process (`common.forking`).
"""
import ctypes
import queue
from multiprocessing import Process, Queue, Value
from time import sleep

from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter

from common.forking import fork_safely
from training.progress import progress


class WorkerFailed(OSError):
    """A writer process exited with a non-zero code before its share was written."""


class CheckedDatasetWriter(DatasetWriter):
    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        work, allocations = Queue(), Queue()
        for todo in queue_content:
            work.put(todo)
        for _ in range(self.num_workers):
            work.put(None)  # one stop token per worker
        done = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                *extra_worker_args)
        procs = [Process(target=work_fn, args=args) for _ in range(self.num_workers)]
        with fork_safely():
            for p in procs:
                p.start()
        try:
            with progress(total=num_samples, desc="writing", unit="img") as bar:
                while bar.n < num_samples:
                    _check(procs)
                    bar.update(done.value - bar.n)
                    sleep(0.1)
            allocation_list = []
            while len(allocation_list) < len(procs):
                try:
                    allocation_list.append(allocations.get(timeout=0.5))
                except queue.Empty:
                    _check(procs)
            self.finalize([a for part in allocation_list for a in part])
        except BaseException:
            # Unread chunks sit in the queue's feeder thread, blocked on a full pipe; Python joins that
            # thread at exit, so without this a failed conversion of a large dataset would never exit.
            work.cancel_join_thread()
            allocations.cancel_join_thread()
            raise
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


def _check(procs):
    for p in procs:
        if p.exitcode not in (None, 0):
            raise WorkerFailed(f"an FFCV writer process exited with code {p.exitcode}")
