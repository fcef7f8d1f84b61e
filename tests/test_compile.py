"""run.compile: the compiled training step is the eager step (same losses, same weights), on the CPU."""
import torch

from bench.step_e2e import SyntheticLoader, random_teacher_ckpt, step_config
from training.loop import Trainer


class _Args:
    student, teacher, num_classes, image_size, batch_size, device = "resnet8", "resnet8", 10, 16, 4, "cpu"


def _run(tmp_path, compiled, steps=2):
    torch.manual_seed(0)
    tmp_path.mkdir()
    folder = str(tmp_path)
    random_teacher_ckpt(_Args.teacher, _Args.num_classes, folder)
    cfg = step_config(_Args, "online", "off", True, folder, compiled=compiled)
    loader = SyntheticLoader(steps, _Args.batch_size, _Args.image_size, _Args.num_classes, torch.device("cpu"), True)
    torch.manual_seed(1)
    tr = Trainer(cfg, torch.device("cpu"), folder, loader, None)
    losses = [float(tr.train_step(b, c)[0][0]["loss"].detach()) for b, c in tr.epoch_batches(0)]
    return tr, losses


def test_compiled_step_equals_eager(tmp_path):
    eager, l_eager = _run(tmp_path / "e", False)
    comp, l_comp = _run(tmp_path / "c", True)
    st = comp.students[0]
    assert isinstance(st.student_fwd, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(comp.teacher_fwd, torch._dynamo.eval_frame.OptimizedModule)
    assert st.student_fwd is not st.student  # checkpoints and validation keep the plain module
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(eager.students[0].student.state_dict().items(), st.student.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-3, atol=1e-4, msg=name)
