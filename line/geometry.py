"""Frames beyond the paper's resize and crop: any H x W, the whole frame, tiles, and the bit depth of wide grey
images. A model records its geometry as plain data (config.geometry); data.geometry_of() reads it back, as a
Geometry when it needs the rules below.
"""
from dataclasses import dataclass

import data

IMAGE_SCORES = ("tiles", "stitched")  # how a tiled frame's image score is made: see Geometry


@dataclass(frozen=True)
class Geometry(data.ResizeCrop):
    """How an image becomes the model's input. Sizes are (height, width); a whole number n means (n, n).

    - image_size: the bilinear resize of every frame (the aspect follows it: frames of other shapes are
      stretched to it), or None: each frame keeps its own size (tiles only; a frame smaller than a tile is
      enlarged, aspect kept, until a tile fits).
    - crop_size: the centre crop of the resized frame the model sees, the paper's protocol (448 -> 392); or None:
      the whole frame, every pixel of it.
    - tile, tile_overlap: the resized frame is covered by tile x tile squares, neighbours sharing the fraction
      tile_overlap of a tile, the last row and column flush with the frame's edges; the model scores each tile
      on its own (its own INPs) and the tiles' maps are averaged where they overlap. None: the whole input.
    - bit_depth: the significant bits of 16-bit, 32-bit integer and float grey images (e.g. 12 for a 12-bit
      sensor in 16-bit files), scaled to the model's range by 2^bit_depth - 1; None: 16 for integer images,
      and float images must hold values in [0, 1]. 8-bit images are read as they are.
    - image_score: the image score of a tiled frame. "tiles": the highest of its tiles' own scores, each tile's
      map scored as the paper scores an image, so that a small defect is not diluted by the frame's normal
      pixels; "stitched": the stitched map of the whole frame scored as one image (models recorded before the
      rule was, which keep it). Maps, regions and pictures are the stitched map's either way.

    The paper's protocol scores its crop's map with a zero-padded Gaussian, which darkens the border pixels;
    whole frames and tiles pad by reflection, so that a defect at the border scores like one inside
    (line.frames.score_frame_maps)."""
    tile: int = None
    tile_overlap: float = 0.0
    bit_depth: int = None
    image_score: str = "stitched"  # what a record without the key means; train.py records "tiles" with --tile

    def __post_init__(self):
        super().__post_init__()
        if self.tile is None:  # an untiled frame has one score: the rule is moot, and geometries then compare equal
            object.__setattr__(self, "image_score", "stitched")

    def check(self, patch_size=14):
        """The one rule for the sizes; raises ValueError naming the flag. Returns the geometry."""
        if self.image_size is None and self.tile is None:
            raise ValueError("--image-size native keeps each frame's own size: it needs --tile N")
        if self.tile is not None:
            data.check_multiple("--tile", (self.tile, self.tile), patch_size)
            if self.crop_size is not None:
                raise ValueError(f"tiles (--tile {self.tile}, given or the checkpoint's) cover the whole frame: pass "
                                 "--crop-size none, or --tile none")
            if not 0.0 <= self.tile_overlap < 1.0:
                raise ValueError(f"--tile-overlap {self.tile_overlap} must be at least 0 and below 1")
            if self.image_size is not None and min(self.image_size) < self.tile:
                raise ValueError(f"--tile {self.tile} must fit in --image-size {data.hw(self.image_size)}")
        elif self.crop_size is None:
            data.check_multiple("--image-size", self.image_size, patch_size,
                                " (with --crop-size none the whole frame is the input)")
        else:
            super().check(patch_size)
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"--image-score {self.image_score}: one of {', '.join(IMAGE_SCORES)}")
        if self.bit_depth is not None and not 1 <= self.bit_depth <= 32:
            raise ValueError(f"--bit-depth {self.bit_depth} must be between 1 and 32")
        return self

    def frame_size(self, height, width) -> tuple:
        if self.image_size is not None:
            return self.image_size
        scale = max(1.0, self.tile / width, self.tile / height)  # a frame smaller than a tile is enlarged
        return max(self.tile, round(height * scale)), max(self.tile, round(width * scale))

    def crop_box(self, frame_height, frame_width) -> tuple:
        """(top, left, height, width) of the model's input in the resized frame: the centre crop, or the whole
        frame."""
        if self.crop_size is None:
            return 0, 0, frame_height, frame_width
        return super().crop_box(frame_height, frame_width)

    def input_size(self) -> tuple:
        """(height, width) of what the model sees: a tile, the crop, or the whole resized frame."""
        if self.tile is not None:
            return self.tile, self.tile
        return self.crop_size if self.crop_size is not None else self.image_size

    def tile_positions(self, frame_height, frame_width) -> list:
        """(top, left) of every tile of a resized frame, row by row; [(0, 0)] when not tiled."""
        if self.tile is None:
            return [(0, 0)]
        return [(top, left) for top in tile_starts(frame_height, self.tile, self.tile_overlap)
                for left in tile_starts(frame_width, self.tile, self.tile_overlap)]

    def describe(self) -> str:
        size = "each frame's own size" if self.image_size is None else data.hw(self.image_size)
        if self.tile is not None:
            scored = "its best tile" if self.image_score == "tiles" else "the stitched frame"
            text = f"{size}, tiles of {self.tile} px overlapping {self.tile_overlap:g}, image scored by {scored}"
        elif self.crop_size is None:
            text = f"{size} px, the whole frame"
        else:
            text = f"{size} -> {data.hw(self.crop_size)} px"
        return text + (f", {self.bit_depth}-bit" if self.bit_depth else "")


def tile_starts(length, tile, overlap):
    """Where tiles start along one side: `tile * (1 - overlap)` apart, the last one flush with the far edge."""
    if length < tile:
        raise ValueError(f"a side of {length} px is shorter than a {tile} px tile")
    stride = max(1, round(tile * (1 - overlap)))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts
