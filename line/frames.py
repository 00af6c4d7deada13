"""Every pixel of a frame: a model scored over the whole frame or over tiles, where the paper scores the centre
crop of a square resize. The geometry (inpformer.Geometry, recorded in the model's config) says which.
"""
import torch

import inpformer
import line.cpu


@torch.no_grad()
def predict_frames(model, frames, geometry=None, zero_shot=False, tile_batch=16):
    """Maps and scores as `geometry` (default: the model's own) prescribes: the paper's crop, the whole frame, or
    tiles. frames: a (B, 3, h, w) batch, or a list of (3, h, w) frames of any sizes (tiles). Returns (B, 256, 256)
    maps and (B,) scores, fp32."""
    geometry = geometry or model.config.geometry
    if geometry.tile is None:
        return inpformer.score_maps(line.cpu.raw_maps(model, frames, zero_shot), padding=geometry.map_padding)
    results = [predict_tiled(model, f, geometry.tile, geometry.tile_overlap, tile_batch, zero_shot) for f in frames]
    return torch.cat([m for m, _ in results]), torch.cat([s for _, s in results])


@torch.no_grad()
def predict_tiled(model, frame, tile, overlap=0.0, batch_size=16, zero_shot=False):
    """One preprocessed frame (3, H, W) covered by tiles (see stitch_tiles), each tile scored on its own (its own
    INPs), the frame's map then resampled, smoothed (reflect padding) and scored as predict() does. A single tile
    covering the frame gives exactly the whole-frame pass. (1, 256, 256), (1,)."""
    frame_map = stitch_tiles(frame[None], tile, overlap, lambda t: line.cpu.raw_maps(model, t, zero_shot), batch_size)
    return inpformer.score_maps(frame_map, padding="reflect")


def stitch_tiles(frames, tile, overlap, tile_maps, batch_size=16):
    """The (B, 1, H, W) raw maps of frames (B, 3, H, W) covered by tile x tile squares (Geometry.tile_positions):
    tile_maps((b, 3, tile, tile)) -> (b, 1, tile, tile) maps batches of about batch_size tiles, and the maps are
    averaged where tiles overlap (so a constant map stays constant). Memory follows the tile batch, not the
    frame. The ONNX export traces this same function."""
    B, _, H, W = frames.shape
    if H < tile or W < tile:
        raise ValueError(f"a {H}x{W} frame is smaller than a {tile} px tile")
    tiling = inpformer.Geometry(image_size=None, crop_size=None, tile=tile, tile_overlap=overlap)
    positions = tiling.tile_positions(H, W)
    # Positions a call, every frame's tile at each; None: all at once (the export, whose batch is symbolic).
    per_batch = len(positions) if batch_size is None else max(1, batch_size // B)
    total = torch.zeros(B, 1, H, W, device=frames.device)
    count = torch.zeros(1, 1, H, W, device=frames.device)
    for i in range(0, len(positions), per_batch):
        chunk = positions[i:i + per_batch]
        tiles = torch.cat([frames[:, :, t:t + tile, l:l + tile] for t, l in chunk])  # position-major
        maps = tile_maps(tiles).float().view(len(chunk), B, 1, tile, tile)
        for (t, l), m in zip(chunk, maps):
            total[:, :, t:t + tile, l:l + tile] += m
            count[:, :, t:t + tile, l:l + tile] += 1
    return total / count
