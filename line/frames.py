"""Every pixel of a frame: a model trained and scored over the whole frame or over tiles, where the paper scores
the centre crop of a square resize. The geometry (line.geometry.Geometry, recorded in the model's config) says
which.
"""
import numpy as np
import torch
import torch.nn.functional as F

import data
import inpformer
import line.cpu
from line.geometry import tile_starts


@torch.no_grad()
def predict_frames(model, frames, geometry=None, zero_shot=False, tile_batch=16):
    """Maps and scores as `geometry` (default: the model's own) prescribes: the paper's crop, the whole frame, or
    tiles. frames: a (B, 3, h, w) batch, or a list of (3, h, w) frames of any sizes (tiles). Returns (B, 256, 256)
    maps and (B,) scores, fp32."""
    geometry = geometry or data.geometry_of(model.config.geometry)
    if geometry.tile is None:
        return score_as(geometry, line.cpu.raw_maps(model, frames, zero_shot))
    results = [predict_tiled(model, f, geometry.tile, geometry.tile_overlap, tile_batch, zero_shot,
                             image_score=geometry.image_score) for f in frames]
    return torch.cat([m for m, _ in results]), torch.cat([s for _, s in results])


@torch.no_grad()
def predict_tiled(model, frame, tile, overlap=0.0, batch_size=16, zero_shot=False, *, image_score):
    """One preprocessed frame (3, H, W) covered by tiles (see stitch_tiles), each tile scored on its own (its own
    INPs): the stitched map resampled and smoothed as score_frame_maps does, and the image score by the rule
    `image_score` (see score_tiled). A single tile covering the frame gives exactly the whole-frame pass.
    (1, 256, 256), (1,)."""

    def tile_maps(tiles):
        return line.cpu.raw_maps(model, tiles, zero_shot)

    frame_maps, best_tile = stitch_tiles(frame[None], tile, overlap, tile_maps, batch_size)
    return score_tiled(frame_maps, best_tile, image_score)


def score_tiled(frame_maps, best_tile, image_score, max_ratio=inpformer.MAX_RATIO):
    """Tiled frames' stitched raw maps (B, 1, H, W) and their best tiles' scores (B,) (stitch_tiles) -> (maps,
    scores): the stitched map resampled and smoothed (score_frame_maps), and the image score by the geometry's
    rule, "tiles" the best tile's, "stitched" the stitched map's (line.geometry.Geometry.image_score)."""
    maps, frame_scores = score_frame_maps(frame_maps, max_ratio)
    return maps, best_tile if image_score == "tiles" else frame_scores


def score_as(geometry, maps, max_ratio=inpformer.MAX_RATIO):
    """Raw maps of inputs prepared with `geometry` -> (maps, scores): the paper's zero-padded protocol for its
    crop (inpformer.score_maps), score_frame_maps for whole frames and tiles."""
    if geometry.crop_size is not None:
        return inpformer.score_maps(maps, max_ratio=max_ratio)
    return score_frame_maps(maps, max_ratio)


def score_frame_maps(maps, max_ratio=inpformer.MAX_RATIO):
    """inpformer.score_maps for whole frames and tiles: the Gaussian pads by reflection, so that the border scores
    like the inside (zeros darken the outer two pixels), and the resample is antialiased, since a frame can be
    many times the map's size, where plain bilinear keeps or drops a narrow peak depending on where it falls."""
    size = inpformer.MAP_SIZE
    with torch.autocast(maps.device.type, enabled=False):
        maps = maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps
        if tuple(maps.shape[-2:]) != (size, size):
            maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        half = inpformer.GAUSSIAN_SIZE // 2
        padded = F.pad(maps, (half, half, half, half), mode="reflect")
        maps = F.conv2d(padded, inpformer.gaussian_kernel().to(maps))[:, 0]
        return maps, inpformer.image_scores(maps, max_ratio)


def stitch_tiles(frames, tile, overlap, tile_maps, batch_size=16, max_ratio=inpformer.MAX_RATIO):
    """Frames (B, 3, H, W) covered by tile x tile squares (line.geometry.tile_starts) -> their (B, 1, H, W) raw
    maps, and (B,) each frame's best tile score. tile_maps((b, 3, tile, tile)) -> (b, 1, tile, tile) maps batches
    of about batch_size tiles; the maps are averaged where tiles overlap (so a constant map stays constant), and
    each tile's own map is scored as the paper scores an image (inpformer.score_maps, the score of the "tiles"
    rule; its zero padding darkens a tile's outer pixels, which with an overlap lie inside the neighbours).
    Memory follows the tile batch, not the frame. The ONNX export traces this same function."""
    B, _, H, W = frames.shape
    if H < tile or W < tile:
        raise ValueError(f"a {H}x{W} frame is smaller than a {tile} px tile")
    positions = [(t, l) for t in tile_starts(H, tile, overlap) for l in tile_starts(W, tile, overlap)]
    # Positions a call, every frame's tile at each; None: all at once (the export, whose batch is symbolic).
    per_batch = len(positions) if batch_size is None else max(1, batch_size // B)
    total = torch.zeros(B, 1, H, W, device=frames.device)
    count = torch.zeros(1, 1, H, W, device=frames.device)
    best = torch.full((B,), -torch.inf, device=frames.device)
    for i in range(0, len(positions), per_batch):
        chunk = positions[i:i + per_batch]
        tiles = torch.cat([frames[:, :, t:t + tile, l:l + tile] for t, l in chunk])  # position-major
        maps = tile_maps(tiles).float()
        tile_scores = inpformer.score_maps(maps, max_ratio=max_ratio)[1]  # each tile as the paper scores an image
        best = torch.maximum(best, tile_scores.view(len(chunk), B).amax(dim=0))
        for (t, l), m in zip(chunk, maps.view(len(chunk), B, 1, tile, tile)):
            total[:, :, t:t + tile, l:l + tile] += m
            count[:, :, t:t + tile, l:l + tile] += 1
    return total / count, best


class TileDataset(torch.utils.data.Dataset):
    """The training samples of a tiled geometry: item k is one tile of one frame (Geometry.tile_positions of its
    resized frame), dict(image (3, tile, tile), mask, label, path, cls). A frame is decoded again for each of
    its tiles here; training decodes each frame once, into data.image_store."""

    def __init__(self, samples, geometry):
        self.frames, self.tile, self.index = data.ImageDataset(samples, geometry), geometry.tile, []
        self.samples, self.geometry, self.positions = self.frames.samples, geometry, []
        for i, s in enumerate(self.samples):
            width, height = data.image_size(s.image)
            frame = geometry.frame_size(height, width)
            self.positions.append(geometry.tile_positions(*frame))
            self.index += [(i, top, left) for top, left in self.positions[i]]
        self.frame_items = [len(p) for p in self.positions]

    def decoded(self, i) -> np.ndarray:
        """The tiles of frame i before normalisation, in item order: (tiles, C, tile, tile) (data.image_store
        decodes each frame once)."""
        frame = self.frames.decoded(i)[0]
        return np.stack([frame[:, top:top + self.tile, left:left + self.tile] for top, left in self.positions[i]])

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        i, top, left = self.index[k]
        item = self.frames[i]
        rows, cols = slice(top, top + self.tile), slice(left, left + self.tile)
        return dict(item, image=item["image"][:, rows, cols].contiguous(), mask=item["mask"][:, rows, cols])
