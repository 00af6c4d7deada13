"""Pictures of anomaly maps: image | [ground truth |] heat-map overlay | colour bar, on a fixed colour scale so that
pictures compare, at the frame's aspect; the --heat-range and --outline options; evaluate.py --save-maps.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import evaluate
import inpformer
import line.decisions

@dataclass
class PictureStyle:
    """How pictures of maps are coloured and titled."""
    calibration: dict = None   # titles with decisions; the colour scale and the outline's pixel threshold
    outline: bool = False      # draw the edge of the region above the calibrated pixel threshold
    heat_range: tuple = None   # (lo, hi): colour maps on this range instead of the calibration's

    def scale(self, cls=None):
        """(lo, hi, source) of the colour scale of class `cls`'s pictures, or None: the caller picks one (min..max
        of its maps)."""
        if self.heat_range:
            return (*self.heat_range, "--heat-range")
        if self.calibration:
            return (*line.decisions.class_rule(self.calibration, cls)["heat_range"], "calibration")
        return None

    def outline_threshold(self, cls=None):
        if not (self.calibration and self.outline):
            return None
        return line.decisions.class_rule(self.calibration, cls)["pixel_threshold"]

    def title(self, path, score, cls=None):
        head = f"{Path(path).name}: score {score:.4g}"
        if not self.calibration:
            return head + " (no calibration)"
        verdict = line.decisions.decide(score, self.calibration, cls)
        return head + f" ({verdict['normalised']:.2f}) {verdict['decision'].upper()}"


def heat_colors(v):
    """Values in [0, 1] -> "jet" colours, (H, W) -> (H, W, 3) uint8."""
    v = np.clip(np.nan_to_num(v), 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def picture_size(height, width) -> tuple:
    """(height, width) of the picture of an input that size: its aspect kept, so that a whole frame is not
    squashed into the map's square; the shorter side MAP_SIZE (a square crop: the map's own size), the longer
    at most four times that."""
    scale = min(inpformer.MAP_SIZE / min(height, width), 4 * inpformer.MAP_SIZE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_rgb(x):
    """A preprocessed (3, h, w) image back to uint8 (H, W, 3) at picture_size(h, w), as the model saw it."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    size = picture_size(*img.shape[-2:])
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _at_size(values, size, mode):
    """A (h, w) map or mask resampled to `size` (bilinear for maps, nearest for masks)."""
    t = torch.as_tensor(np.asarray(values, np.float32))[None, None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=tuple(size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    return t[0, 0].numpy()


# Pictures are written at zlib level 1: a sixth larger than at the default level 6, written twice as fast.
PNG_LEVEL = 1


def picture(image, amap, scale, title="", mask=None, outline=None) -> Image.Image:
    """image | [ground truth |] heat-map overlay | colour bar, under a title line. scale = (lo, hi, source):
    the map is coloured on this fixed range, so that pictures sharing it compare, and the source is stated on
    the bar. outline: a pixel threshold, whose region's edge is drawn in white (and marked on the bar). The map and
    mask (256 x 256) are drawn at the image's size (to_rgb's, the frame's aspect)."""
    lo, hi, source = scale
    (h, w) = image.shape[:2]
    amap = _at_size(amap, (h, w), "bilinear").astype(np.float64)
    if mask is not None:
        mask = _at_size(mask, (h, w), "nearest") > 0.5
    heat = heat_colors((amap - lo) / max(hi - lo, 1e-12))
    overlay = (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32) + 0.5).astype(np.uint8)
    if outline is not None:
        inside = amap >= outline
        # The edge: pixels of the region (not on the picture's border) with a 4-neighbour outside it.
        core = inside[1:-1, 1:-1]
        surrounded = inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        overlay[1:-1, 1:-1][core & ~surrounded] = 255
    panels = [image]
    if mask is not None:
        panels.append(np.repeat(np.asarray(mask, np.uint8)[..., None] * 255, 3, axis=2))
    x = w * (len(panels) + 1)
    canvas = Image.new("RGB", (x + 84, h + 14), "white")
    canvas.paste(Image.fromarray(np.concatenate(panels + [overlay], axis=1)), (0, 14))
    bar = heat_colors(np.linspace(1, 0, h)[:, None].repeat(12, axis=1))
    canvas.paste(Image.fromarray(bar), (x + 4, 14))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    labels = [(14, f"{hi:.4g}"), (h + 3, f"{lo:.4g}"), (14 + h // 2 - 16, source[:12]), (14 + h // 2, source[12:24])]
    for y, text in labels:
        draw.text((x + 19, y), text, fill="black")
    if outline is not None and lo <= outline <= hi:
        y = 14 + round((hi - outline) / max(hi - lo, 1e-12) * (h - 1))
        draw.line([(x + 2, y), (x + 17, y)], fill="black", width=2)
    return canvas


def file_stem(path):
    """A file name for a picture of `path`: its folder and stem, other characters replaced by _."""
    p = Path(path)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{p.parent.name}_{p.stem}")


def picture_style(args, calibration, ckpt, log=print) -> PictureStyle:
    """The pictures --outline and --heat-range ask for, titled and scaled by `calibration` (or None)."""
    if args.outline and not calibration:
        log(f"note: --outline draws the calibrated pixel threshold, and {ckpt} has no calibration")
    return PictureStyle(calibration, args.outline, args.heat_range)


def save_maps(model, ds, scores, opts, folder, cls):
    """Pictures of the opts.save_maps most and least anomalous images of one class: most_01_* has the highest
    score, least_01_* the lowest (ties: the earlier image). These images are scored again, so that the pass
    over the class keeps no maps. One colour scale: opts.pictures', else min..max of these pictures."""
    n = opts.save_maps
    most = sorted(range(len(ds)), key=lambda i: -scores[i])[:n]
    least = sorted(range(len(ds)), key=lambda i: scores[i])[:n]
    picks = [(f"most_{rank:02d}", i) for rank, i in enumerate(most, start=1)]
    picks += [(f"least_{rank:02d}", i) for rank, i in enumerate(least, start=1)]
    items = [ds[i] for _, i in picks]
    maps = [evaluate.predict_maps(model, item["image"][None], opts.zero_shot, ds.geometry, opts.batch_size)[0][0]
            .cpu().numpy() for item in items]
    style = opts.pictures or PictureStyle()
    scale = style.scale(cls) or (min(m.min() for m in maps), max(m.max() for m in maps), "min..max here")
    folder.mkdir(parents=True, exist_ok=True)
    for (name, i), item, amap in zip(picks, items, maps):
        mask = evaluate.masks_at_map_size(item["mask"][None])[0]
        title = style.title(item["path"], float(scores[i]), cls)
        image = picture(to_rgb(item["image"]), amap, scale, title, mask.numpy(), style.outline_threshold(cls))
        image.save(folder / f"{name}_{file_stem(item['path'])}.png", compress_level=PNG_LEVEL)
