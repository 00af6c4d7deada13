"""What evaluate.py (the benchmark) and predict.py (the line) share: the decision rule a calibration stores,
pictures of maps on a fixed colour scale, a checkpoint ready to score and images to anomaly maps and scores on
the official protocol, and the data a checkpoint was trained on. A library module, not a script.
"""
import copy
import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import cli
import data
import inpformer
import line.cpu
import line.frames

# -----------------------------------------------------------------------------------------------------
# The decision rule a calibration stores (predict.py --calibrate writes it; see predict.calibration)

# What every calibration holds (predict.calibration builds it; older ones may lack the other keys it writes).
CALIBRATION_KEYS = {"image_threshold", "pixel_threshold", "score_range", "heat_range", "classes"}


def read_calibration(meta: dict, path, log=print):
    """The calibration in a checkpoint's metadata, or None (with a note if it is there but unusable)."""
    cal = meta.get("calibration")
    if cal is None or (isinstance(cal, dict) and CALIBRATION_KEYS <= set(cal)):
        return cal
    log(f"note: {path}: unreadable calibration metadata, ignored (predict.py --calibrate writes a new one)")
    return None


def normalise(score, calibration, threshold):
    """anomalib's normalised score, (score - threshold) / (max - min) + 0.5 over the calibration scores,
    clipped to [0, 1]: a float for a float, a tensor for a tensor (the exported graph)."""
    lo, hi = calibration["score_range"]
    v = (score - threshold) / max(hi - lo, 1e-12) + 0.5
    if isinstance(v, torch.Tensor):
        return v.clamp(0, 1)
    return min(max(float(v), 0.0), 1.0)


def class_threshold(calibration, cls=None):
    """The image threshold for class `cls`: its own when the calibration has one, else the pooled one."""
    return calibration.get("classes", {}).get(cls, calibration["image_threshold"])


def decide(score, calibration, cls=None) -> dict:
    """One image score under a calibration: threshold (see class_threshold), normalised score (see normalise)
    and decision, "anomalous" when the score is at or above the threshold, else "normal"."""
    t = class_threshold(calibration, cls)
    return dict(threshold=t, normalised=normalise(score, calibration, t),
                decision="anomalous" if score >= t else "normal")

# -----------------------------------------------------------------------------------------------------
# Pictures


@dataclass
class PictureStyle:
    """How pictures of maps are coloured and titled."""
    calibration: dict = None   # titles with decisions; the colour scale and the outline's pixel threshold
    outline: bool = False      # draw the edge of the region above the calibrated pixel threshold
    heat_range: tuple = None   # (lo, hi): colour maps on this range instead of the calibration's

    def scale(self):
        """(lo, hi, source) of the colour scale, or None: the caller picks one (min..max of its maps)."""
        if self.heat_range:
            return (*self.heat_range, "--heat-range")
        if self.calibration:
            return (*self.calibration["heat_range"], "calibration")
        return None

    def outline_threshold(self):
        return self.calibration["pixel_threshold"] if self.calibration and self.outline else None

    def title(self, path, score, cls=None):
        head = f"{Path(path).name}: score {score:.4g}"
        if not self.calibration:
            return head + " (no calibration)"
        verdict = decide(score, self.calibration, cls)
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


# -----------------------------------------------------------------------------------------------------
# A model ready to score, and images to maps and scores


@dataclass
class Options:
    """How to score images: batching, device and precision, how images are prepared, the kind of map, and how
    pictures look; evaluate.Options adds the benchmark's. The defaults are the command line's but for workers:
    from Python, images load in the calling process unless asked."""
    batch_size: int = 16
    device: str = "auto"
    precision: str = "auto"  # the model runs in this dtype; maps and scores are fp32 whatever it is
    workers: int = 0
    geometry: data.ResizeCrop = None  # None: the model's own (data.geometry_of its config's)
    zero_shot: bool = False  # maps are the INP distance (the paper's zero-shot protocol)
    pictures: PictureStyle = field(default_factory=PictureStyle)


def load_ready(ckpt, device, precision):
    """A checkpoint loaded straight onto `device` in `precision` (see ready_model: scoring it needs no copy)."""
    dtype = cli.PRECISIONS[cli.resolve_precision(precision, device)]
    model = inpformer.load_model(ckpt, device).to(dtype)
    line.cpu.use_cpu_attention(model.encoder)
    return model


def asked_geometry(model, args, ckpt, log=print, base=None) -> data.ResizeCrop:
    """The model's own geometry (or `base`, e.g. a calibration's), with the sizes the command line gives
    (cli.geometry); a note says when it differs from the model's."""
    own = data.geometry_of(model.config.geometry)
    geometry = cli.geometry(args, base or own)
    if geometry != own:
        log(f"note: {ckpt} was trained at {own.describe()}; scoring at {geometry.describe()} as asked")
    return geometry.check(model.encoder.config.patch_size)


def ready_model(model, device="auto", precision="auto"):
    """The model in eval mode on `device`, in `precision`: the model itself when it already is, else a copy,
    so that scoring never changes the model the caller handed in."""
    device = cli.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = cli.PRECISIONS[cli.resolve_precision(precision, device)]
    p = model.prototype_token
    if p.device == device and p.dtype == dtype and not model.training:
        # line/cpu.py's attention, where it is faster, is set on a copy: never on the caller's model
        if not line.cpu.needs_cpu_attention(model.encoder) or line.cpu.uses_cpu_attention(model.encoder):
            return model
    model = copy.deepcopy(model).to(device, dtype).eval()
    line.cpu.use_cpu_attention(model.encoder)
    return model


def predict_maps(model, x, zero_shot=False, geometry=None, tile_batch=Options.batch_size, predictor=None):
    """Preprocessed images -> (B, 256, 256) smoothed float32 maps and (B,) image scores, on the protocol of
    `geometry` (default: the model's; see line.frames.predict_frames): reconstruction error, or with zero_shot the
    INP distance; or predictor(x, geometry) -> (maps, scores) instead (the kNN baseline). x: a (B, 3, h, w)
    batch, or a list of frames (tiles); cast to the model's dtype and device."""
    p = model.prototype_token
    x = [f.to(p.device, p.dtype) for f in x] if isinstance(x, list) else x.to(p.device, p.dtype)
    with torch.inference_mode():
        if predictor is None:
            maps, scores = line.frames.predict_frames(model, x, geometry, zero_shot, tile_batch)
        else:
            maps, scores = predictor(x, geometry or data.geometry_of(model.config.geometry))
    return maps.float(), scores.float()


def scored_batches(model, dataset, batch_size=Options.batch_size, workers=0, zero_shot=False, predictor=None):
    """(batch, maps, scores) for each batch of `dataset` (an ImageDataset), maps and scores on the CPU, on the
    dataset's geometry (predictor: see predict_maps). Tiled: one frame a batch, its tiles batch_size at a time,
    so that memory follows the tile batch, not the frames' sizes."""
    pin = model.prototype_token.device.type == "cuda"
    frames = 1 if dataset.geometry.tile else batch_size
    loader = torch.utils.data.DataLoader(dataset, batch_size=frames, num_workers=workers, pin_memory=pin,
                                         collate_fn=data.ImageDataset.collate)
    for batch in loader:
        maps, scores = predict_maps(model, batch["image"], zero_shot, dataset.geometry, batch_size, predictor)
        yield batch, maps.cpu(), scores.cpu()


def masks_at_map_size(masks):
    """(B, 1, h, w) 0/1 masks (or a list of (1, h, w)) -> (B, 256, 256) bool, as the official protocol resizes
    them: nearest, then > 0.5."""
    size = (inpformer.MAP_SIZE, inpformer.MAP_SIZE)
    if isinstance(masks, list):
        return torch.cat([masks_at_map_size(m[None]) for m in masks])
    return F.interpolate(masks, size=size, mode="nearest")[:, 0] > 0.5


class Progress:
    """A progress line every `every` seconds: images done, images/s, ETA."""

    def __init__(self, total, log, every=10.0):
        self.total, self.log, self.every, self.done = total, log, every, 0
        self.start = self.last = time.monotonic()

    def step(self, n, what):
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last, rate = now, self.done / (now - self.start)
            self.log(f"  {what}: {self.done}/{self.total} images, {rate:.1f} img/s, "
                     f"ETA {cli.format_time((self.total - self.done) / rate)}")

    def rate(self):
        return self.done / max(time.monotonic() - self.start, 1e-9)

# -----------------------------------------------------------------------------------------------------
# Checkpoints and the data they were trained on


def checkpoint_files(path) -> list[Path]:
    """[model file]: the file itself, <dir>/model.safetensors, or every <dir>/<class>/model.safetensors (the
    models of a single-class run)."""
    p = Path(path)
    if not p.is_dir():
        return [p]  # a file that is not there: loading it says so
    found = sorted(p.glob("model.safetensors")) or sorted(p.glob("*/model.safetensors"))
    if not found:
        raise ValueError(f"{p}: no model.safetensors in it or in its sub-folders")
    return found


@dataclass
class DataSet:
    """One data set to score a model on."""
    data: str
    root: str
    classes: object  # "all", a comma list or a list of names
    own: bool = None  # the model was trained on it; None when the checkpoint does not say


def plan_data_sets(meta: dict, ckpt, names=None, roots=None, classes=None) -> list[DataSet]:
    """The data sets to score `ckpt` on: those named (names and roots: comma lists, as --data and --data-root),
    else the ones it was trained on, with the classes it was trained on (another data set: all its classes,
    unless `classes` names some). The checkpoint's own data is found by name, by folder (the same folder under
    another data-set name), or as a "folder" data set whose classes are all classes the checkpoint knows (held-out
    images of its own classes)."""
    trained, trained_roots = data.split_list(meta.get("data")), data.split_list(meta.get("data_root"))
    per_set, trained_classes = meta.get("classes_per_set"), meta.get("classes")
    if not isinstance(per_set, list) or len(per_set) != len(trained):
        per_set = [trained_classes or "all"] if len(trained) == 1 else ["all"] * len(trained)
    wanted, roots = data.split_list(names) or trained, data.split_list(roots)
    if not wanted:
        raise ValueError(f"{ckpt}: the checkpoint records no data set (the official state dict has no metadata): "
                         "pass --data and --data-root")
    if roots and len(roots) != len(wanted):
        raise ValueError(f"--data names {len(wanted)} data set(s) but --data-root gives {len(roots)} folder(s)")
    sets = []
    for i, name in enumerate(wanted):
        k = _trained_index(name, i, trained, trained_roots, roots)
        recorded_root = k is not None and k < len(trained_roots)
        if roots:
            root = roots[i]
        elif recorded_root:
            root = trained_roots[k]
            if not Path(root).is_dir():
                raise ValueError(f"{root}: not found; {ckpt} was trained on {name} there: pass --data-root where it "
                                 "is now")
        else:
            root = data.default_root(name)
        if root is None:
            raise ValueError(f"--data {name} needs --data-root (the folder holding the data set)")
        if k is not None:
            own, wanted_classes = True, classes or per_set[k]
        elif name == "folder" and trained_classes:
            own, wanted_classes = set(data.list_classes(name, root)) <= set(trained_classes), classes or "all"
        else:
            own, wanted_classes = False, classes or "all"
        sets.append(DataSet(name, root, wanted_classes, own=own if trained else None))
    return sets


def _trained_index(name, i, trained, trained_roots, roots):
    """The index of data set `name` (the i-th asked) among those the checkpoint was trained on: by name, or by
    its folder; None when it is another data set."""
    if name in trained:
        return trained.index(name)
    if not roots:
        return None
    for j, trained_root in enumerate(trained_roots):
        if Path(trained_root).resolve() == Path(roots[i]).resolve():
            return j
    return None


def write_csv(path, header, rows):
    """A CSV file of a header row and rows (the scripts' metrics.csv, image_scores.csv, predictions.csv)."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
