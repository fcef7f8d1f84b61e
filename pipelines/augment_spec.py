"""The paper's strong augmentation, defined once: every backend reads this op list and its ranges.

RandAugment as in CRLD's released code (FixMatch-style, uniform magnitudes): `N_OPS` ops drawn
*with replacement* from `STRONG_OPS`, each with a magnitude drawn uniformly from its range, then
Cutout always: a square of side U(0, CUTOUT_MAX_FRAC) x image width, centred uniformly in the
image (clipped at the borders) and filled with `CUTOUT_FILL`.
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
