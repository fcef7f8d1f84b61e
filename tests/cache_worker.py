"""cache_teacher.py as the tests launch it under torchrun, with the deaths a build meets, driven by the environment:
  CRLD_TEST_RANK1_KILL_AT_UNIT=U      rank 1 is killed (SIGKILL, as `kill -9`) as it starts writing its U-th unit
  CRLD_TEST_RANK1_SIGTERM_AT_BATCH=B  rank 1 alone gets SIGTERM right after writing its B-th batch (a preemption
                                      seen by one node)
"""
import faulthandler
import os
import signal
import sys

import cache_teacher
from training.cli import run_main
from training.teacher_cache import RowWriter

if __name__ == "__main__":
    faulthandler.enable()
    kill_at = int(os.environ.get("CRLD_TEST_RANK1_KILL_AT_UNIT", "0"))
    term_at = int(os.environ.get("CRLD_TEST_RANK1_SIGTERM_AT_BATCH", "0"))
    if os.environ.get("RANK") == "1" and (kill_at or term_at):
        write, units, batches = RowWriter.write, set(), [0]

        def hooked_write(self, index, logits):
            units.add(self.final)
            if len(units) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            write(self, index, logits)
            batches[0] += 1
            if batches[0] == term_at:
                os.kill(os.getpid(), signal.SIGTERM)
        RowWriter.write = hooked_write
    sys.exit(run_main(lambda: cache_teacher.main(sys.argv[1:])))
