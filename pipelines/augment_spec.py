"""The paper's strong augmentation, defined once: every backend reads this op list and its ranges.

RandAugment as in CRLD's released code (FixMatch-style, uniform magnitudes): `N_OPS` ops drawn
*with replacement* from `STRONG_OPS`, each with a magnitude drawn uniformly from its range, then
Cutout always: a square of side U(0, CUTOUT_MAX_FRAC) x image width, centred uniformly in the
image (clipped at the borders) and filled with `CUTOUT_FILL`.

One departure, kept because teacher caches fingerprint these pixels and the backends are pinned to
them bit for bit: the Cutout centre. Here it is U[0, w) (and U[0, h)). The released `CutoutAbs`
(mdistiller/dataset/cifar100.py, imagenet.py and tinyimagenet200.py of scx-822/CRLD-main) draws
`x0 = np.random.uniform(w)`, i.e. numpy's `uniform(low=w, high=1.0)`, which returns
w - (w - 1) * U[0, 1): a centre in (1, w]. The released boxes therefore sit about half a pixel further
right and down (32 x 32: column 0 erased in 4.3% of views instead of 5.0%, the mean erased area 86.0
pixels instead of 86.6); the rest of the box (int(max(0, c - v / 2)), min(w, x0 + v), PIL's inclusive
corners, the fill) is the released code's (docs/design.md).
"""
from typing import NamedTuple, Tuple


class OpSpec(NamedTuple):
    name: str
    low: float
    high: float


# Order matters: an op is identified by its index here in view parameters and caches.
STRONG_OPS: Tuple[OpSpec, ...] = (
    OpSpec("AutoContrast", 0, 1),
    OpSpec("Brightness", 0.05, 0.95),
    OpSpec("Color", 0.05, 0.95),
    OpSpec("Contrast", 0.05, 0.95),
    OpSpec("Equalize", 0, 1),
    OpSpec("Identity", 0, 1),
    OpSpec("Posterize", 4, 8),        # bits kept: int(v)
    OpSpec("Rotate", -30, 30),        # degrees, counter-clockwise, black fill, nearest
    OpSpec("Sharpness", 0.05, 0.95),
    OpSpec("ShearX", -0.3, 0.3),      # affine (1, v, 0, 0, 1, 0), nearest
    OpSpec("ShearY", -0.3, 0.3),
    OpSpec("Solarize", 0, 256),       # invert pixels >= threshold
    OpSpec("TranslateX", -0.3, 0.3),  # fraction of the width
    OpSpec("TranslateY", -0.3, 0.3),  # fraction of the height
)
N_OPS = 2
CUTOUT_MAX_FRAC = 0.5
CUTOUT_FILL = (125, 123, 114)
# Bump when the definition above changes: view caches fingerprint it.
SPEC_VERSION = 1
