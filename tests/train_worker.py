"""train.py as the tests launch it, alone or under torchrun: with a batch-independent student (resnet8_gn:
BatchNorm -> GroupNorm), so a 2-rank DDP run and a 1-process run over the same global batch agree to float
noise (BN would see per-rank batches), and with the deaths a real run meets, driven by the environment:
  CRLD_TEST_KILL_AFTER_EPOCH=N      the process writing last.pt is killed (SIGKILL, as `kill -9`) right after
                                    epoch N's checkpoint: the kill-and-resume tests
  CRLD_TEST_KILL_AT_STEP=S          SIGKILL when a student is about to take step S (kill -9 mid-epoch)
  CRLD_TEST_SLOW_STEP_S=T           every training step sleeps T seconds first (a signal lands mid-step), after
                                    writing its step number to the file CRLD_TEST_STEP_FILE if that is set
  CRLD_TEST_RANK1_DIES_AT_STEP=S    rank 1 exits at step S (an OOM kill, a node failure)
  CRLD_TEST_RANK1_SIGTERM_AT_STEP=S rank 1 alone gets SIGTERM right after step S (a preemption seen by one node)
  CRLD_TEST_RANK1_NAN_AT_STEP=S     rank 1's loss is NaN at step S (the other ranks' stays finite)
  CRLD_TEST_RANK1_OVERRIDE=KEY=V    rank 1 resolves another config (a node whose files differ)
"""
import faulthandler
import os
import signal
import sys
import time

import torch.nn as nn

import train
from training import models
from training.cli import run_main
from training.student import Student


def resnet8_gn(num_classes):
    m = models.create_model("resnet8", num_classes)
    for name, mod in list(m.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(mod, child_name, nn.GroupNorm(4, child.num_features))
    return m


models._REGISTRY["resnet8_gn"] = resnet8_gn

if __name__ == "__main__":
    faulthandler.enable()  # a rank killed by a signal (SIGABRT, SIGSEGV) prints its Python stack for the test's report
    argv = sys.argv[1:]
    kill_after = int(os.environ.get("CRLD_TEST_KILL_AFTER_EPOCH", "0"))
    if kill_after:
        save = Student.save

        def save_then_die(self, name):
            save(self, name)
            if name == "last.pt" and self.epoch == kill_after and self.is_main:
                os.kill(os.getpid(), signal.SIGKILL)
        Student.save = save_then_die
    kill_at, slow = int(os.environ.get("CRLD_TEST_KILL_AT_STEP", "-1")), float(os.environ.get("CRLD_TEST_SLOW_STEP_S", 0))
    if kill_at >= 0 or slow:
        plain_step = Student.train_step

        def hooked_step(self, *a, **k):
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ.get("CRLD_TEST_STEP_FILE"):
                with open(os.environ["CRLD_TEST_STEP_FILE"], "w") as f:
                    f.write(str(self.step))
            time.sleep(slow)
            return plain_step(self, *a, **k)
        Student.train_step = hooked_step
    die_at = int(os.environ.get("CRLD_TEST_RANK1_DIES_AT_STEP", "0"))
    if die_at and os.environ.get("RANK") == "1":  # a rank lost mid-epoch (OOM kill, node failure)
        step = Student.train_step

        def dying_step(self, *a, **k):
            if self.step == die_at:
                os._exit(1)
            return step(self, *a, **k)
        Student.train_step = dying_step
    term_at = int(os.environ.get("CRLD_TEST_RANK1_SIGTERM_AT_STEP", "-1"))
    if term_at >= 0 and os.environ.get("RANK") == "1":
        step_once = Student.train_step

        def signalled_step(self, *a, **k):
            out = step_once(self, *a, **k)
            if self.step == term_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        Student.train_step = signalled_step
    nan_at = int(os.environ.get("CRLD_TEST_RANK1_NAN_AT_STEP", "-1"))
    if nan_at >= 0 and os.environ.get("RANK") == "1":
        forward = Student.forward_losses

        def nan_forward(self, *a, **k):
            losses, s_w = forward(self, *a, **k)
            if self.step == nan_at:
                losses["kd_cv"] = losses["kd_cv"] * float("nan")
                losses["loss"] = losses["loss"] + losses["kd_cv"]
            return losses, s_w
        Student.forward_losses = nan_forward
    if os.environ.get("RANK") == "1" and os.environ.get("CRLD_TEST_RANK1_OVERRIDE"):
        argv.append(os.environ["CRLD_TEST_RANK1_OVERRIDE"])  # a node whose config differs
    sys.exit(run_main(lambda: train.main(argv)))
