"""Wide grey pixel formats from line cameras: 16-bit, 32-bit integer and float grey images become float grey in
[0, 1] by the bit-depth rule (line.geometry.Geometry.bit_depth), never clipped: a value outside the range is an
error naming the file. Pillow's own conversion of those to 8 bits clips at 255, which turns a 16-bit frame
near-white.
"""
import numpy as np
from PIL import Image

import data


def wide_grey(path, im, bit_depth=None) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as float grey ("F") in [0, 1]: integers divided by
    2^bits - 1 (bits: bit_depth, else 16), floats taken as they are, or divided by 2^bit_depth - 1 when given."""
    values = np.asarray(im, dtype=np.float64)
    if im.mode == "F" and bit_depth is None:
        top, rule = 1.0, "float images must hold values in [0, 1]"
    else:
        bits = bit_depth or 16
        top, rule = 2.0**bits - 1, f"{bits}-bit data lies in [0, {2**bits - 1}]"
    if not np.isfinite(values).all() or values.min() < 0:
        raise data.error(path, f"{im.mode} values from {values.min():g} to {values.max():g}: negative or not "
                               "finite, no pixel data this reads")
    if values.max() > top:
        raise data.error(path, f"{im.mode} values from {values.min():g} to {values.max():g}, but {rule}: pass "
                               "--bit-depth N for N-bit data")
    return Image.fromarray((values / top).astype(np.float32), "F")
