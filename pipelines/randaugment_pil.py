"""PIL implementation of the strong view (the reference the tensor implementations are held to)."""
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from pipelines.augment_spec import CUTOUT_FILL, STRONG_OPS
from pipelines.view_params import StrongParams


def _affine(img, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs)


PIL_OPS = {
    "AutoContrast": lambda img, v: ImageOps.autocontrast(img),
    "Brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "Color": lambda img, v: ImageEnhance.Color(img).enhance(v),
    "Contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "Equalize": lambda img, v: ImageOps.equalize(img),
    "Identity": lambda img, v: img,
    "Posterize": lambda img, v: ImageOps.posterize(img, max(1, int(v))),
    "Rotate": lambda img, v: img.rotate(v),
    "Sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    "ShearX": lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda img, v: ImageOps.solarize(img, v),
    "TranslateX": lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])),
}
assert set(PIL_OPS) == {s.name for s in STRONG_OPS}


def cutout_box(w: int, h: int, frac: float, cx: float, cy: float):
    """The original CutoutAbs box (x0, y0, x1, y1), inclusive corners as PIL draws them."""
    v = frac * w
    x0 = int(max(0, cx * w - v / 2.0))
    y0 = int(max(0, cy * h - v / 2.0))
    return x0, y0, min(w, x0 + v), min(h, y0 + v)


def apply_strong(img: Image.Image, p: StrongParams) -> Image.Image:
    for i, v in p.ops:
        img = PIL_OPS[STRONG_OPS[i].name](img, v)
    if p.cutout_frac > 0:
        img = img.copy()
        ImageDraw.Draw(img).rectangle(cutout_box(*img.size, p.cutout_frac, p.cutout_cx, p.cutout_cy),
                                      CUTOUT_FILL)
    return img
