"""The strong-view definition and the replayable view parameters."""
import numpy as np
import pytest
from PIL import Image

from pipelines import augment_spec
from pipelines.randaugment_pil import PIL_OPS, apply_strong, cutout_box
from pipelines.view_params import (STRONG, WEAK, StrongParams, pad_crop, random_resized_crop, sample_views,
                                   strong_params, view_rng)

PAPER_OPS = [("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95),
             ("Contrast", 0.05, 0.95), ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8),
             ("Rotate", -30, 30), ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3),
             ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3), ("TranslateY", -0.3, 0.3)]


def test_op_list_and_ranges_equal_the_paper():
    assert [tuple(o) for o in augment_spec.STRONG_OPS] == PAPER_OPS
    assert augment_spec.N_OPS == 2
    assert augment_spec.CUTOUT_MAX_FRAC == 0.5
    assert augment_spec.CUTOUT_FILL == (125, 123, 114)


def test_params_are_a_pure_function_of_seed_epoch_index_view():
    a = [strong_params(view_rng(3, 5, 17, STRONG)) for _ in range(2)]
    assert a[0] == a[1]
    others = {strong_params(view_rng(*k)) for k in [(4, 5, 17, 1), (3, 6, 17, 1), (3, 5, 18, 1), (3, 5, 17, 0)]}
    assert a[0] not in others and len(others) == 4


def test_view_rng_is_the_fresh_philox_stream_in_every_thread():
    from concurrent.futures import ThreadPoolExecutor

    def fresh(seed, epoch, index, view):
        return np.random.Generator(np.random.Philox(key=seed, counter=[view, index, epoch, 0]))

    def draws(g):  # 32-bit (buffered), 64-bit and float draws, interleaved
        return (tuple(g.integers(0, 1000, 3)), g.random(), int(g.integers(0, 2**40)), tuple(g.random(3)))

    keys = [(s, e, i, v) for s in (0, 7, 2**63 + 5) for e in (0, 3) for i in (0, 1, 999) for v in (0, 1)]
    want = [draws(fresh(*k)) for k in keys]
    view_rng(1, 2, 3, 0).integers(0, 10)  # leaves a 32-bit value buffered: must not leak into the next stream
    assert [draws(view_rng(*k)) for k in keys] == want
    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(lambda k: draws(view_rng(*k)), keys * 4)) == want * 4


def test_magnitudes_ops_and_cutout_are_drawn_from_the_spec_ranges():
    counts = np.zeros(len(PAPER_OPS))
    for i in range(3000):
        p = strong_params(view_rng(0, 0, i, STRONG))
        assert len(p.ops) == 2
        for k, v in p.ops:
            lo, hi = PAPER_OPS[k][1:]
            assert lo <= v <= hi
            counts[k] += 1
        assert 0 <= p.cutout_frac < 0.5 and 0 <= p.cutout_cx < 1 and 0 <= p.cutout_cy < 1
    # drawn with replacement, uniformly: every op appears ~ 6000/14 times
    assert counts.min() > 330 and counts.max() < 530


def test_pad_crop_offsets_cover_the_padding():
    tops = {pad_crop(view_rng(0, 0, i, WEAK), 32, 32, 32, 4).top for i in range(500)}
    assert tops == set(range(-4, 5))


def test_random_resized_crop_boxes_fit_the_image():
    for i in range(300):
        c = random_resized_crop(view_rng(1, 0, i, WEAK), 300, 400)
        assert 0 <= c.top and c.top + c.height <= 300 and 0 <= c.left and c.left + c.width <= 400


@pytest.mark.parametrize("name", [o[0] for o in PAPER_OPS])
def test_each_pil_op_runs_and_keeps_size(name):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    k = [o[0] for o in PAPER_OPS].index(name)
    lo, hi = PAPER_OPS[k][1:]
    out = PIL_OPS[name](img, (lo + hi) / 2 if name != "Identity" else 0)
    assert out.size == img.size and out.mode == "RGB"


def test_cutout_paints_the_fill_colour():
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    out = np.asarray(apply_strong(img, StrongParams(((5, 0.0),), 0.4, 0.5, 0.5)))
    x0, y0, x1, y1 = cutout_box(32, 32, 0.4, 0.5, 0.5)
    assert (x0, y0) == (9, 9)
    assert (out[y0, x0] == (125, 123, 114)).all()
    assert (out[0, 0] == 0).all()


def test_sample_views_gives_independent_weak_and_strong_crops():
    pairs = [sample_views(0, 0, i, 32, 32, crop="pad", size=32, pad=4)[:2] for i in range(50)]
    assert sum(w != s for w, s in pairs) > 40
