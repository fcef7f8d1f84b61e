"""train.py with a batch-independent student (BatchNorm -> GroupNorm), so a 2-rank DDP run and a
1-process run over the same global batch must agree to float noise (BN would see per-rank batches).
Launched by tests/test_ddp.py, alone or under torchrun."""
import os
import sys

import torch.nn as nn

from training import models


def resnet8_gn(num_classes):
    m = models.create_model("resnet8", num_classes)
    for name, mod in list(m.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(mod, child_name, nn.GroupNorm(4, child.num_features))
    return m


models._REGISTRY["resnet8_gn"] = resnet8_gn

if __name__ == "__main__":
    import train
    from training.cli import run_main
    argv = sys.argv[1:]
    die_at = int(os.environ.get("CRLD_TEST_RANK1_DIES_AT_STEP", "0"))
    if die_at and os.environ.get("RANK") == "1":  # a rank lost mid-epoch (OOM kill, node failure)
        from training.loop import Trainer
        step = Trainer.train_step

        def dying_step(self, *a, **k):
            if self.step == die_at:
                os._exit(1)
            return step(self, *a, **k)
        Trainer.train_step = dying_step
    if os.environ.get("RANK") == "1" and os.environ.get("CRLD_TEST_RANK1_OVERRIDE"):
        argv.append(os.environ["CRLD_TEST_RANK1_OVERRIDE"])  # a node whose config differs
    sys.exit(run_main(lambda: train.main(argv)))
