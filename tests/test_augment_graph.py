"""The static-shape strong-view program (`pipeline.strong_program=graph`): the segmented augmenter's
pixels bit for bit, with a launch sequence fixed by the shapes alone (what a CUDA graph needs)."""
import numpy as np
import pytest
import torch

from pipelines.augment_spec import STRONG_OPS
from pipelines.randaugment_graph import StrongGraph, apply_strong_static, strong_program
from pipelines.randaugment_segmented import StrongBatch, apply_strong_batch
from pipelines.view_params import StrongParams, strong_draws
from test_augment_segmented import draws_of

META = torch.device("meta")


def batch(rng, n, h, w, smooth_every=2):
    x = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    x[::smooth_every] = x[::smooth_every] // 3 + 60  # low-contrast samples: the histogram ops differ there
    return torch.from_numpy(x)


def every_op_in_every_round(n_ops, n, rng):
    """Each sample a different op sequence, so every op meets every other across the rounds; random
    magnitudes in the spec's ranges; Cutout on most samples."""
    params = []
    for i in range(n):
        specs = [(i + 5 * k) % len(STRONG_OPS) for k in range(n_ops)]
        ops = tuple((j, float(STRONG_OPS[j].low + rng.random() * (STRONG_OPS[j].high - STRONG_OPS[j].low)))
                    for j in specs)
        frac = float(rng.random() * 0.5) if i % 4 else 0.0
        params.append(StrongParams(ops, frac, float(rng.random()), float(rng.random())))
    return draws_of(params)


def graph_program(x, params, channels_last_input=False):
    return StrongGraph()(x, params, channels_last_input)


@pytest.mark.parametrize("n_ops", [1, 2, 3])
def test_equals_the_segmented_augmenter_bit_for_bit_on_every_op(n_ops):
    rng = np.random.default_rng(n_ops)
    x = batch(rng, 42, 37, 29)
    for params in (every_op_in_every_round(n_ops, 42, rng), StrongBatch.from_draws(strong_draws(n_ops, 0, np.arange(42), n_ops))):
        want = apply_strong_batch(x, params, channels_last_input=True)
        got = graph_program(x, params, channels_last_input=True)
        assert got.dtype == torch.uint8 and got.shape == x.shape and got.is_contiguous()
        diff = (want != got).any(-1).flatten(1).any(1)
        assert not diff.any(), f"samples differing: {diff.nonzero().flatten().tolist()}"


def test_float_nchw_and_tiny_images_equal_too():
    rng = np.random.default_rng(9)
    params = every_op_in_every_round(2, 28, rng)
    for h, w in ((2, 2), (3, 5), (16, 16)):  # below 3 px Sharpness keeps the image (PIL's border rule)
        x = batch(rng, 28, h, w).permute(0, 3, 1, 2).float()
        want, got = apply_strong_batch(x, params), graph_program(x, params)
        assert got.dtype == torch.float32 and got.shape == x.shape and torch.equal(want, got), (h, w)


def test_identity_only_and_empty_batches():
    x = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    ident = draws_of([StrongParams(((5, 0.0), (5, 0.0)), 0.0, 0.5, 0.5)] * 3)
    assert STRONG_OPS[5].name == "Identity" and torch.equal(graph_program(x, ident), x)
    empty = StrongBatch(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.float64),
                        torch.zeros(0, 3, dtype=torch.float64))
    assert graph_program(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), empty, True).shape == (0, 8, 8, 3)


def test_program_runs_on_shapes_alone_while_the_segmented_one_cannot():
    """On the meta device tensors have shapes and no data: a program that runs there reads nothing back
    to the host and makes every launch decision from shapes, so one capture serves every batch of that
    shape. The segmented augmenter plans on the host from the data, so it cannot run there (the check
    can fail)."""
    x = torch.empty(8, 32, 24, 3, dtype=torch.uint8, device=META)
    ops, mags = (torch.empty(8, 2, dtype=torch.float64, device=META) for _ in range(2))
    cut = torch.empty(8, 3, dtype=torch.float64, device=META)
    y = apply_strong_static(x, ops, mags, cut, channels_last_input=True)
    assert y.device == META and y.shape == x.shape and y.dtype == torch.uint8
    with pytest.raises(NotImplementedError, match="meta"):
        apply_strong_batch(x, StrongBatch(ops.long(), mags, cut), channels_last_input=True)


def test_config_names_the_program():
    assert strong_program("segmented") is apply_strong_batch
    assert isinstance(strong_program("graph"), StrongGraph)


def test_gpu_backend_batches_are_identical_under_either_program(demo_cfg, first_batches):
    """Through a whole loader on the accelerator route (on the CPU the graph program runs eagerly)."""
    (a, _), (b, _) = (first_batches(demo_cfg("pipeline.route=device", f"pipeline.strong_program={p}",
                                             pipeline="gpu"), epoch=1) for p in ("segmented", "graph"))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x.weak, y.weak) and torch.equal(x.strong, y.strong) and torch.equal(x.index, y.index)


def test_compiles_as_one_graph_and_stays_exact():
    """What runs on CUDA is the compiled program: it must compile without graph breaks (fullgraph), and
    compiled on the CPU it still equals the segmented augmenter. One op per round keeps compilation short."""
    rng = np.random.default_rng(4)
    x = batch(rng, 28, 20, 18)
    program = StrongGraph(compile=True, max_graphs=1)
    every = every_op_in_every_round(1, 28, rng)
    for params in (every, every, StrongBatch.from_draws(strong_draws(1, 0, np.arange(28), 1))):
        # the first batch of a shape runs eagerly, the second compiles it, the third reuses it
        assert torch.equal(program(x, params, True), apply_strong_batch(x, params, channels_last_input=True))
        assert program._compiled is None or len(program.graphs) == 1
    assert len(program.graphs) == 1 and program._compiled is not None
    other = batch(rng, 3, 20, 18)  # beyond max_graphs: the eager program, no second compilation
    p3 = StrongBatch.from_draws(strong_draws(0, 0, np.arange(3), 1))
    assert torch.equal(program(other, p3, True), apply_strong_batch(other, p3, channels_last_input=True))
    assert len(program.graphs) == 1


def test_a_ragged_first_batch_leaves_the_slot_to_the_full_batch():
    """A run resumed at an epoch's short last batch: that shape runs eagerly, and the full batch that comes
    after it (twice) takes the one slot; the short one, back an epoch later, stays eager."""
    rng = np.random.default_rng(5)
    program = StrongGraph(max_graphs=1)
    full, short = batch(rng, 8, 12, 12), batch(rng, 3, 12, 12)
    for x in (short, full, full, full, short):
        p = StrongBatch.from_draws(strong_draws(0, 0, np.arange(len(x)), 2))
        assert torch.equal(program(x, p, True), apply_strong_batch(x, p, channels_last_input=True))
    assert [key[0] for key in program.graphs] == [tuple(full.shape)]


class _FakeStream:
    def wait_stream(self, other):
        pass


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_capture_runs_with_garbage_collection_off(monkeypatch, enabled_before):
    """A finaliser run during a CUDA graph capture (a CUDA tensor or event freed) aborts the capture: the
    capture runs after a collection and with collection off, and leaves it as it found it. The CUDA calls
    are stand-ins, so the real capture code runs on the CPU."""
    import gc
    from contextlib import contextmanager, nullcontext

    from pipelines import randaugment_graph
    seen = []

    @contextmanager
    def graph(*args, **kwargs):
        seen.append("capture")
        yield
        seen.append("captured")

    monkeypatch.setattr(torch.cuda, "Stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(gc, "collect", lambda *a: seen.append("collect"))

    def program(*args):
        seen.append(("program", gc.isenabled()))
        return args[0]

    (gc.enable if enabled_before else gc.disable)()
    try:
        x = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
        randaugment_graph._Captured.__new__(randaugment_graph._Captured)._capture(program, x, 2, True)
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable()
    assert seen == [("program", enabled_before), "collect", "capture", ("program", False), "captured"]
