"""The strong-view definition and the replayable view parameters."""
import numpy as np
import pytest
from PIL import Image

from pipelines import augment_spec
from pipelines.randaugment_pil import PIL_OPS, apply_strong, cutout_box
from pipelines.view_params import STRONG, WEAK, StrongParams, crops, draw_views, philox, strong_draws, uniforms

PAPER_OPS = [("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95),
             ("Contrast", 0.05, 0.95), ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8),
             ("Rotate", -30, 30), ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3),
             ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3), ("TranslateY", -0.3, 0.3)]


def test_op_list_and_ranges_equal_the_paper():
    assert [tuple(o) for o in augment_spec.STRONG_OPS] == PAPER_OPS
    assert augment_spec.N_OPS == 2
    assert augment_spec.CUTOUT_MAX_FRAC == 0.5
    assert augment_spec.CUTOUT_FILL == (125, 123, 114)


def strong_params(seed, epoch, index):
    return strong_draws(seed, epoch, [index]).params(0)


def test_params_are_a_pure_function_of_seed_epoch_index_view():
    a = [strong_params(3, 5, 17) for _ in range(2)]
    assert a[0] == a[1]
    others = {strong_params(*k) for k in [(4, 5, 17), (3, 6, 17), (3, 5, 18)]}
    assert a[0] not in others and len(others) == 3
    weak, strong = (crops(3, 5, [17], (300, 400), v, crop="rrc", size=224, pad=0) for v in (WEAK, STRONG))
    assert not np.array_equal(weak, strong)


def test_a_batch_draw_equals_each_sample_drawn_alone():
    """Views do not depend on which batch (or rank, or epoch table) a sample is drawn in."""
    rng = np.random.default_rng(0)
    index = rng.permutation(10_000)[:64]
    hw = rng.integers(20, 600, (64, 2))
    for crop in ("pad", "rrc"):
        vb = draw_views(7, 3, index, hw, crop=crop, size=16, pad=4)
        for j in (0, 5, 63):
            alone = draw_views(7, 3, index[j:j + 1], hw[j], crop=crop, size=16, pad=4)
            assert np.array_equal(alone.boxes[0], vb.boxes[j]) and alone.strong.params(0) == vb.strong.params(j)
        rev = draw_views(7, 3, index[::-1], hw[::-1], crop=crop, size=16, pad=4)
        assert np.array_equal(rev.boxes[::-1], vb.boxes) and np.array_equal(rev.strong.mags[::-1], vb.strong.mags)


def test_philox_matches_the_random123_known_answers():
    """philox4x32_10 known-answer vectors of Random123 (kat_vectors): the generator is the published one."""
    cases = [(0, [0, 0, 0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
             (2**64 - 1, [0xffffffff] * 4, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
             (0x299f31d0a4093822, [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
              [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1])]
    for key, ctr, want in cases:
        assert philox(key, np.array(ctr, dtype=np.uint64)).tolist() == want
    u = uniforms(0, 0, np.arange(20_000), 0, 4)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03


def test_magnitudes_ops_and_cutout_are_drawn_from_the_spec_ranges():
    d = strong_draws(0, 0, np.arange(3000))
    assert d.ops.shape == d.mags.shape == (3000, 2)
    lo, hi = np.array([o[1] for o in PAPER_OPS])[d.ops], np.array([o[2] for o in PAPER_OPS])[d.ops]
    assert ((lo <= d.mags) & (d.mags <= hi)).all()
    frac, cx, cy = d.cutout.T
    assert (0 <= frac).all() and (frac < 0.5).all() and (0 <= cx).all() and (cx < 1).all() and (cy < 1).all()
    # drawn with replacement, uniformly: every op appears ~ 6000/14 times
    counts = np.bincount(d.ops.ravel(), minlength=len(PAPER_OPS))
    assert counts.min() > 330 and counts.max() < 530


def test_pad_crop_offsets_cover_the_padding():
    boxes = crops(0, 0, np.arange(500), (32, 32), WEAK, crop="pad", size=32, pad=4)
    assert set(boxes[:, 0].tolist()) == set(range(-4, 5)) and set(boxes[:, 4].tolist()) == {0, 1}
    assert (boxes[:, 2:4] == 32).all()


def rrc_reference(u, img_h, img_w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params written as torchvision does, fed the same uniforms."""
    import math
    area = img_h * img_w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[2 * t + 1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= img_w and 0 < h <= img_h:
            return min(int(u[-3] * (img_h - h + 1)), img_h - h), min(int(u[-2] * (img_w - w + 1)), img_w - w), h, w
    in_ratio = img_w / img_h
    if in_ratio < ratio[0]:
        w, h = img_w, int(round(img_w / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = img_h, int(round(img_h * ratio[1]))
    else:
        w, h = img_w, img_h
    return (img_h - h) // 2, (img_w - w) // 2, h, w


def test_random_resized_crop_follows_torchvision_and_fits_the_image():
    rng = np.random.default_rng(1)
    hw = np.concatenate([rng.integers(8, 700, (400, 2)), [[10, 600], [600, 10], [3, 3], [1, 2]]])  # + fallbacks
    index = np.arange(len(hw))
    boxes = crops(1, 0, index, hw, WEAK, crop="rrc", size=224, pad=0)
    from pipelines.view_params import RRC_UNIFORMS
    u = uniforms(1, 0, index, WEAK, RRC_UNIFORMS)
    for j, (h, w) in enumerate(hw.tolist()):
        assert tuple(boxes[j, :4]) == rrc_reference(u[j].tolist(), h, w)
        t, l, bh, bw = boxes[j, :4]
        assert 0 <= t and t + bh <= h and 0 <= l and l + bw <= w and bh > 0 and bw > 0


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


def test_weak_and_strong_crops_are_drawn_independently():
    vb = draw_views(0, 0, np.arange(50), (32, 32), crop="pad", size=32, pad=4)
    assert sum(vb.crop(j, WEAK) != vb.crop(j, STRONG) for j in range(50)) > 40
