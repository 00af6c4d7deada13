"""Evaluate INP-Former: the paper's seven metrics per class, pictures of what the model found, and scores for
new, unlabelled images.

    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors           # on the data it was trained on
    python evaluate.py --ckpt model.pth --data mvtec --data-root /data/mvtec_anomaly_detection   # authors' weights
    python evaluate.py --ckpt runs/realiad-multi/model.safetensors --data mvtec --data-root /data/mvtec --zero-shot
    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors --save-maps 5  # + 5 most/least anomalous per class
    python evaluate.py --ckpt runs/mvtec-single                   # a single-class run: each class with its own model
    python evaluate.py --ckpt runs/realiad-multi/model.safetensors --streaming  # bounded memory on Real-IAD
    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors --full-res     # pixel metrics at native resolution
    python evaluate.py --ckpt runs/line7/model.safetensors --images new_parts/  # CSV of scores + heat-maps

The data arguments default to what the checkpoint's metadata records (data set, root, classes, image and crop
size), so `--ckpt` alone re-evaluates a model on its own data, if that data is still where it was. The
authors' `model.pth` records nothing: give --data and --data-root.

Written under --out (default: beside the checkpoint, `eval/`; `eval-<data>`, `-zero-shot`, `-full-res` are
appended for the other protocols, so one never overwrites another):
  metrics.json, metrics.csv, metrics.md   per class and mean: I-AUROC I-AP I-F1max P-AUROC P-AP P-F1max AUPRO
                                          (fractions in json/csv, percent with one decimal in the table)
  image_scores.csv                        every test image's score and label
  maps/<class>/{most,least}_NN_*.png      --save-maps N: image | ground truth | heat-map overlay, 768x256
  predictions.csv, heatmaps/*.png         --images: score per image; image | heat-map overlay, 512x256

Protocol (the official `evaluation_batch(max_ratio=0.01, resize_mask=256)`): maps at the crop size, resized
bilinearly to 256x256, 5x5 Gaussian with sigma 4 and zero padding; image score = mean of the top 1% (655) of
the smoothed pixels; ground truth = the crop-size mask resized to 256 with `nearest`, then > 0.5. Every class
is scored on its own; "mean" is the plain average over classes (NaN when a class's metric is undefined).
Metrics come from metrics.py and are exact (every distinct score is a threshold), not the 200-bin
approximations the authors' GPU code reports; expect pixel AP a little off the paper's numbers.

Memory: one class at a time. Exact metrics keep the class's maps in float32 and its masks as bool, and
scoring them peaks at about 2.4x the maps' bytes (bench/bench_eval.py: 1725 maps of 256x256 as one class are
432 MiB and peak at +1.0 GiB; a 5000-image class needs about 3 GB). --map-dtype float16 stores the maps rounded
to float16 (spacing 2.4e-4 to 4.9e-4 for values in [0.25, 1)); the ties that rounding creates move the metrics
(by ~0.015 points in the bench), so it is an explicit option, never the default, and saves about a third of
the peak. --streaming keeps only the image scores and metrics.py's 65536-bin histograms over [0, 2]
(resolution 3.1e-5, 8-16x finer than float16 there): ~0.1 GB whatever the class size (Real-IAD), pixel metrics
of the binned scores, and the largest possible difference from the exact ones in metrics.json ("error_bounds").

--full-res (the MVTec AD protocol: pixel metrics at each image's own resolution). The preprocessing resizes to
image-size and centre-crops, so the map covers only the crop's part of the original image. That part (the
crop box scaled back to the original size, rounded to whole pixels) is what is scored: the 256x256 smoothed
map is resized bilinearly to it, and compared with the original mask cut to the same box (binarised as at 256:
> 127 for 0/255 masks, > 0 for raw VisA index masks). The border outside the crop (1/16 of the side on each
side at 448 -> 392) is left out rather than filled with invented scores. Image scores are the official ones (from the 256 map). Exact --full-res needs one
image size per class; use --streaming for mixed sizes.

--zero-shot (paper Table S8, official INP_Former_Zero_Shot.py): the map is the INP distance, per token the
minimum over INPs of 1 - cos(fused encoder token, INP), not the reconstruction error; then the same resizing,
smoothing and scoring.

Bad input (a file that is no checkpoint, a crop size the model cannot take, data that is not there) ends with
one line "error: ..." on stderr and exit status 2; INPFORMER_TRACEBACK=1 shows the traceback instead.
"""
import argparse
import contextlib
import csv
import heapq
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data as datasets  # the module; `data` is the name of a data set in the functions below
import inpformer
import metrics

METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")  # the paper's column order
EVAL_SIZE = 256  # official resize_mask
MAX_RATIO = 0.01  # image score: mean of the top 1% of the map's pixels
FPR_LIMIT = 0.3  # AUPRO integration limit

# -----------------------------------------------------------------------------------------------------
# Command-line pieces shared with train.py


class CliError(Exception):
    """A bad argument or argument combination; the message is one line."""


def add_data_args(parser, required=False):
    """The data options of evaluate.py and train.py. Defaults are None so that the caller can fill them in
    (evaluate.py from the checkpoint's metadata, train.py from the data set)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=required,
                   help=f"data set: {', '.join(datasets.DATASETS)}, or a comma list of them")
    g.add_argument("--data-root", help="folder holding the data set (comma list, one per --data; demo: built in)")
    g.add_argument("--classes", help='"all" (default) or a comma list of class names')
    g.add_argument("--image-size", type=int, help="side of the square resize before the centre crop (default 448)")
    g.add_argument("--crop-size", type=int,
                   help="side of the centre crop fed to the model, a multiple of the patch size 14 (default 392)")
    g.add_argument("--batch-size", type=int, help="images per batch (default 16)")
    g.add_argument("--workers", type=int, help="data-loading processes (default: up to 4)")
    g.add_argument("--device", help='"auto" (default: cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...')
    return g


def pick_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else must name a device that is there."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _one_line(exc) -> str:
    # data.one_line also digs the message out of an exception a DataLoader worker re-raised with its traceback.
    return " ".join(datasets.one_line(exc).split())


def guard(main) -> None:
    """Run main(); bad input ends with one line "error: ..." on stderr and exit status 2, never a traceback.

    Bad input is what the user can fix: a data problem (data.DataError), a weights file (inpformer.WeightsError),
    an argument (CliError, ValueError) or a file system problem (OSError). Set INPFORMER_TRACEBACK=1 to see the
    traceback anyway (a ValueError can also be a bug)."""
    try:
        rc = main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (datasets.DataError, inpformer.WeightsError, CliError, OSError, ValueError) as e:
        if os.environ.get("INPFORMER_TRACEBACK"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        if os.environ.get("INPFORMER_TRACEBACK"):
            raise
        print("error: out of GPU memory; lower --batch-size", file=sys.stderr)
        sys.exit(2)
    if rc:
        sys.exit(rc)


def check_sizes(model, image_size, crop_size):
    p = model.encoder.config.patch_size
    if crop_size % p:
        raise CliError(f"--crop-size {crop_size} is not a multiple of the model's patch size {p} (e.g. {crop_size // p * p or p})")
    if not 0 < crop_size <= image_size:
        raise CliError(f"--crop-size {crop_size} must be at most --image-size {image_size}")


def autocast(device, precision):
    """Mixed precision on CUDA only (bf16 or fp16 on request); the CPU always runs fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


# -----------------------------------------------------------------------------------------------------
# The map path: images -> 256x256 maps and image scores, masks -> 256x256 ground truth


def predict_maps(model, x, zero_shot=False, out_size=EVAL_SIZE):
    """(B, 3, c, c) preprocessed images -> (B, out, out) smoothed float32 maps and (B,) image scores, on the
    official protocol: reconstruction error, or with zero_shot the INP distance (§6.5 of the reference)."""
    predict = model.predict_zero_shot if zero_shot else model.predict
    with torch.inference_mode():
        maps, scores = predict(x, out_size=out_size, max_ratio=MAX_RATIO)
    return maps.float(), scores.float()


def eval_masks(masks, size=EVAL_SIZE):
    """(B, 1, c, c) 0/1 crop-size masks -> (B, size, size) bool: `nearest`, then > 0.5, as the official code."""
    return F.interpolate(masks.float(), size=(size, size), mode="nearest")[:, 0] > 0.5


def crop_box(width, height, image_size, crop_size):
    """(left, top, right, bottom) of the centre crop in the original image's pixels, rounded.

    data.py resizes to image_size x image_size (aspect not kept) and crops at torchvision's rounded offset."""
    offset = int(round((image_size - crop_size) / 2.0))
    sx, sy = width / image_size, height / image_size
    return (round(offset * sx), round(offset * sy), round((offset + crop_size) * sx), round((offset + crop_size) * sy))


def read_native_mask(sample, box):
    """A test sample's mask at its original resolution, cut to `box`: bool (h, w); all False for normal images.
    Binarised as data.py binarises it: > 127 for 0/255 masks, > sample.mask_threshold where that is set."""
    left, top, right, bottom = box
    if sample.mask is None:
        return np.zeros((bottom - top, right - left), bool)
    with Image.open(sample.mask) as m:
        if m.mode not in ("L", "P"):
            m = m.convert("L")
        threshold = sample.mask_threshold
        # A raw (index) mask is thresholded on its index values, a 0/255 one on its grey values.
        a = np.asarray(m if threshold is not None else m.convert("L"))
    return a[top:bottom, left:right] > (127 if threshold is None else threshold)


class NativeMasks(torch.utils.data.Dataset):
    """A test set whose items also carry `native_mask`: the mask at original resolution, cut to the crop box.
    Read in the loader workers; batches keep these as lists (sizes can differ)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        sample = self.ds.samples[i]
        with Image.open(sample.image) as im:
            size = im.size
        box = crop_box(*size, self.ds.image_size, self.ds.crop_size)
        item["native_mask"] = torch.from_numpy(read_native_mask(sample, box))
        return item

    @staticmethod
    def collate(items):
        native = [item.pop("native_mask") for item in items]
        batch = torch.utils.data.default_collate(items)
        batch["native_mask"] = native
        return batch


def to_native(maps, native_masks):
    """The 256x256 maps resized bilinearly to the size of each native mask: a list of (h, w) maps."""
    return [F.interpolate(m[None, None], size=tuple(t.shape), mode="bilinear", align_corners=False)[0, 0]
            for m, t in zip(maps, native_masks)]


# -----------------------------------------------------------------------------------------------------
# Accumulating and scoring one class


class ClassScores:
    """Image labels and scores and pixel masks and maps of one class, added batch by batch; then the seven
    metrics.

    Exact (default): maps go into one preallocated (N, H, W) buffer (float32, or float16 on request) and masks
    into a bool one, and metrics.compute_all ranks them exactly. Streaming: masks and maps only update a
    metrics.PixelHistogram, whose memory does not grow; image scores are always kept exactly (N floats)."""

    def __init__(self, n, streaming=False, map_dtype=torch.float32):
        self.n, self.count = n, 0
        self.labels = torch.zeros(n, dtype=torch.bool)
        self.scores = torch.zeros(n, dtype=torch.float32)
        self.hist = metrics.PixelHistogram() if streaming else None
        self.map_dtype = map_dtype
        self.masks = self.maps = None  # allocated at the first batch, once the map size is known

    def add(self, labels, scores, masks, maps):
        """labels, scores: (B,); masks (bool) and maps: (B, H, W) tensors, or lists of (H, W) tensors."""
        b, i = len(scores), self.count
        if i + b > self.n:
            raise ValueError(f"more than the {self.n} images announced")
        self.labels[i:i + b] = torch.as_tensor(labels).bool()
        self.scores[i:i + b] = torch.as_tensor(scores).float()
        self.count += b
        if self.hist is not None:
            for m, s in (zip(masks, maps) if isinstance(maps, list) else [(masks, maps)]):
                self.hist.update(m, s)
            return
        shapes = {tuple(s.shape) for s in maps} if isinstance(maps, list) else {tuple(maps.shape[1:])}
        if self.maps is None:
            shape = shapes.pop() if len(shapes) == 1 else None
            if shape:
                self.maps = torch.empty((self.n, *shape), dtype=self.map_dtype)
                self.masks = torch.empty((self.n, *shape), dtype=torch.bool)
        if self.maps is None or shapes - {tuple(self.maps.shape[1:])}:
            raise CliError(f"test images of one class have different sizes ({', '.join(map(str, sorted(shapes)))}); "
                           "exact --full-res needs one size per class, use --streaming")
        if isinstance(maps, list):
            maps, masks = torch.stack(maps), torch.stack(list(masks))
        self.maps[i:i + b] = maps
        self.masks[i:i + b] = masks

    def compute(self, warn=None):
        """{metric: float} in METRICS order; undefined metrics are NaN, and warn(message) says why."""
        if self.count != self.n:
            raise ValueError(f"{self.count} of {self.n} images were added")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", metrics.UndefinedMetricWarning)
            if self.hist is None:
                result = metrics.compute_all(self.labels, self.scores, self.masks, self.maps, fpr_limit=FPR_LIMIT)
            else:
                result = {"I-AUROC": metrics.auroc(self.labels, self.scores),
                          "I-AP": metrics.average_precision(self.labels, self.scores),
                          "I-F1max": metrics.f1_max(self.labels, self.scores),
                          **self.hist.compute(fpr_limit=FPR_LIMIT)}
        for w in caught:  # one log line each instead of python's two-line warning format
            if warn:
                warn(str(w.message))
        return {k: float(result[k]) for k in METRICS}

    def error_bounds(self):
        """Streaming only: the largest possible |binned - exact| per pixel metric."""
        return self.hist.error_bounds(fpr_limit=FPR_LIMIT)


# -----------------------------------------------------------------------------------------------------
# Pictures


def heat_colors(v):
    """Values in [0, 1] -> "jet" colours, (H, W) -> (H, W, 3) uint8."""
    v = np.clip(np.nan_to_num(v), 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


_MEAN = torch.tensor(datasets.IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(datasets.IMAGENET_STD).view(3, 1, 1)


def to_rgb(x, size=EVAL_SIZE):
    """A preprocessed (3, c, c) image back to (size, size, 3) uint8, as the model saw it."""
    img = (x.detach().float().cpu() * _STD + _MEAN).clamp(0, 1)
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def picture(image, amap, lo, hi, mask=None):
    """image | [ground truth |] heat-map overlay, side by side: (H, 2W or 3W, 3) uint8. The map is coloured on
    the fixed range [lo, hi], so that pictures sharing a range can be compared."""
    heat = heat_colors((np.asarray(amap, np.float64) - lo) / max(hi - lo, 1e-12))
    overlay = (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32) + 0.5).astype(np.uint8)
    panels = [image]
    if mask is not None:
        panels.append(np.repeat(np.asarray(mask, np.uint8)[..., None] * 255, 3, axis=2))
    return np.concatenate(panels + [overlay], axis=1)


def _file_stem(path):
    p = Path(path)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{p.parent.name}_{p.stem}")


class Gallery:
    """The n most and the n least anomalous images of one class, kept (at 256x256) while the class streams
    past, so that pictures cost no second pass and no stored maps."""

    def __init__(self, n):
        self.n, self.seen = n, 0
        self.most, self.least = [], []  # min-heaps of (key, -seen, item): the root is the first to go

    def offer(self, score, make_item):
        """Keep this image if it ranks; make_item() builds its pictures' inputs only then. Ties: earlier wins."""
        if self.n <= 0:
            return
        order = -self.seen
        self.seen += 1
        item = None
        for heap, key in ((self.most, score), (self.least, -score)):
            if len(heap) < self.n or (key, order) > heap[0][:2]:
                item = item or make_item()
                if len(heap) < self.n:
                    heapq.heappush(heap, (key, order, item))
                else:
                    heapq.heapreplace(heap, (key, order, item))

    def write(self, folder):
        """most_01_*.png (highest score first) and least_01_*.png (lowest first), on one colour range."""
        kept = [e[2] for e in self.most + self.least]
        if not kept:
            return []
        folder.mkdir(parents=True, exist_ok=True)
        lo = min(float(item["map"].min()) for item in kept)
        hi = max(float(item["map"].max()) for item in kept)
        written = []
        for name, heap in (("most", self.most), ("least", self.least)):
            for rank, (_, _, item) in enumerate(sorted(heap, reverse=True), start=1):
                path = folder / f"{name}_{rank:02d}_{_file_stem(item['path'])}.png"
                Image.fromarray(picture(item["image"], item["map"], lo, hi, item["mask"])).save(path)
                written.append(path)
        return written


# -----------------------------------------------------------------------------------------------------
# Evaluation


def format_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A progress line every `every` seconds: images done, images/s, ETA."""

    def __init__(self, total, log, every=10.0):
        self.total, self.log, self.every = total, log, every
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def step(self, n, what):
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.start)
            self.log(f"  {what}: {self.done}/{self.total} images, {rate:.1f} img/s, "
                     f"ETA {format_time((self.total - self.done) / rate)}")

    def rate(self):
        return self.done / max(time.monotonic() - self.start, 1e-9)


def _max_defined(values):
    return max((v for v in values if not math.isnan(v)), default=float("nan"))


def _mean(per_class):
    return {k: float(np.mean([m[k] for m in per_class.values()])) for k in METRICS}


def combine(parts, **protocol):
    """One results dict (classes, mean, counts) from the results of disjoint sets of classes, e.g. the models
    of a single-class run."""
    per_class, counts = {}, {}
    for r in parts:
        per_class.update(r["classes"])
        counts.update(r["counts"])
    return {"classes": per_class, "mean": _mean(per_class), "counts": counts,
            "protocol": dict(parts[-1]["protocol"], **protocol)}


def evaluate(model, data, root, classes, image_size=448, crop_size=392, batch_size=16, device="cpu", workers=0,
             zero_shot=False, full_res=False, streaming=False, save_maps=0, out_dir=None, log=print,
             precision="fp32", map_dtype="float32"):
    """The seven metrics of `model` on the test sets of `classes` ("all", "a,b" or a list) of one data set.

    Returns {"classes": {class: {metric: value}}, "mean": {metric: value}, "counts": ..., "protocol": ...}
    (fractions; NaN where undefined; streaming adds "error_bounds"). Writes nothing unless out_dir is given:
    then metrics.json/.csv/.md, image_scores.csv, and with save_maps=N the pictures under maps/<class>/.
    log receives progress lines. precision ("bf16", "fp16") applies on CUDA only; map_dtype "float16"
    stores maps rounded to float16 (see the module docstring)."""
    device = torch.device(device)
    check_sizes(model, image_size, crop_size)
    if map_dtype not in ("float32", "float16"):
        raise CliError(f"--map-dtype {map_dtype!r}: use float32 or float16")
    if streaming and map_dtype != "float32":
        raise CliError("--map-dtype applies to exact metrics; --streaming keeps no maps")
    classes = datasets.resolve_classes(data, root, classes)
    # Build every test set first: their pre-flight file checks fail now, not an hour into the run.
    test_sets = {cls: datasets.test_set(data, root, cls, image_size, crop_size) for cls in classes}
    total = sum(len(ds) for ds in test_sets.values())
    what = "INP distance (zero-shot)" if zero_shot else "reconstruction error"
    log(f"{data}: {len(classes)} classes, {total} test images, {image_size} -> {crop_size} px, {what} maps, "
        f"pixels at {'original resolution' if full_res else f'{EVAL_SIZE}x{EVAL_SIZE}'}, "
        f"{'streaming' if streaming else 'exact'} metrics, {device}")
    model = model.to(device).eval()
    amp = autocast(device, precision)
    progress = Progress(total, log)
    per_class, counts, bounds, rows = {}, {}, {}, []
    for cls, ds in test_sets.items():
        t0 = time.monotonic()
        source = NativeMasks(ds) if full_res else ds
        loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=workers,
                                             pin_memory=device.type == "cuda",
                                             collate_fn=NativeMasks.collate if full_res else None)
        acc = ClassScores(len(ds), streaming, getattr(torch, map_dtype))
        gallery = Gallery(save_maps if out_dir else 0)
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            with amp:
                maps, scores = predict_maps(model, x, zero_shot)
            maps, scores = maps.cpu(), scores.cpu()
            masks = eval_masks(batch["mask"])
            labels = batch["label"]
            if full_res:
                acc.add(labels, scores, batch["native_mask"], to_native(maps, batch["native_mask"]))
            else:
                acc.add(labels, scores, masks, maps)
            for i, path in enumerate(batch["path"]):
                rows.append((cls, path, int(labels[i]), float(scores[i])))
                gallery.offer(float(scores[i]), lambda i=i, path=path: dict(
                    image=to_rgb(batch["image"][i]), mask=masks[i].numpy(), map=maps[i].numpy(), path=path))
            progress.step(len(x), cls)
        per_class[cls] = acc.compute(warn=lambda msg, cls=cls: log(f"  note: {cls}: {msg}"))
        n_bad = int(acc.labels.sum())
        counts[cls] = {"normal": len(ds) - n_bad, "anomalous": n_bad}
        if streaming:
            bounds[cls] = acc.error_bounds()
        if out_dir:
            gallery.write(Path(out_dir) / "maps" / cls)
        m = per_class[cls]
        log(f"  {cls}: {len(ds)} images ({n_bad} anomalous) in {time.monotonic() - t0:.1f}s; "
            + " ".join(f"{k} {100 * m[k]:.1f}" for k in METRICS)
            + (f"; binning error <= {100 * _max_defined(bounds[cls].values()):.3f} points" if streaming else ""))
    log(f"{data}: {total} images, {progress.rate():.1f} img/s")

    results = {"classes": per_class, "mean": _mean(per_class), "counts": counts,
               "protocol": dict(data=data, root=str(root), image_size=image_size, crop_size=crop_size,
                                maps="inp-distance" if zero_shot else "reconstruction",
                                pixels="original" if full_res else EVAL_SIZE, gaussian_sigma=4,
                                max_ratio=MAX_RATIO, fpr_limit=FPR_LIMIT,
                                metrics=f"streaming ({metrics.PixelHistogram().bins} bins over [0, 2])"
                                if streaming else f"exact ({map_dtype} maps)",
                                precision=precision if device.type == "cuda" else "fp32")}
    if streaming:
        results["error_bounds"] = bounds
    if out_dir:
        write_results(results, out_dir, rows)
    return results


# -----------------------------------------------------------------------------------------------------
# Output


def markdown_table(results) -> str:
    """Each class, then "mean"; the paper's columns; percent with one decimal ("n/a" where undefined)."""
    def cell(v):
        return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"

    lines = ["| class | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, m in [*results["classes"].items(), ("mean", results["mean"])]:
        lines.append(f"| {name} | " + " | ".join(cell(m[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def _json_safe(x):
    # JSON has no NaN: undefined metrics are written as null.
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_results(results, out_dir, image_rows=None):
    """metrics.json, metrics.csv (class, then the seven metrics as fractions), metrics.md, image_scores.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *METRICS])
        for name, m in [*results["classes"].items(), ("mean", results["mean"])]:
            w.writerow([name, *(repr(float(m[k])) for k in METRICS)])
    (out / "metrics.md").write_text(markdown_table(results) + "\n")
    if image_rows is not None:
        with open(out / "image_scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "path", "label", "score"])
            w.writerows((c, p, label, repr(s)) for c, p, label, s in image_rows)


# -----------------------------------------------------------------------------------------------------
# Predictions on new images


def image_files(specs):
    """Image files named by `specs` (files, or folders searched recursively, hidden entries skipped), sorted
    within each folder."""
    files = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in datasets.IMAGE_SUFFIXES and q.is_file()
                            and not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise CliError(f"{p}: no such file or folder")
    if not files:
        raise CliError(f"{', '.join(map(str, specs))}: no images ({', '.join(datasets.IMAGE_SUFFIXES)})")
    return files


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files, image_size, crop_size):
        self.files, self.image_size, self.crop_size = list(files), image_size, crop_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return dict(image=datasets.load_image(self.files[i], self.image_size, self.crop_size), path=str(self.files[i]))


def predict_images(model, files, image_size=448, crop_size=392, batch_size=16, device="cpu", workers=0,
                   out_dir=None, zero_shot=False, precision="fp32", heat_range=None, log=print):
    """Score unlabelled images: [(path, score, heat-map file name)], and with out_dir predictions.csv and
    heatmaps/<name>.png (image | overlay, 512x256). The overlay is coloured on heat_range (lo, hi) when given
    (use it to compare images), else on each image's own min..max, as the official visualisation does."""
    device = torch.device(device)
    check_sizes(model, image_size, crop_size)
    model = model.to(device).eval()
    amp = autocast(device, precision)
    loader = torch.utils.data.DataLoader(ImageFiles(files, image_size, crop_size), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    heat_dir = Path(out_dir) / "heatmaps" if out_dir else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)
    progress, rows, used = Progress(len(files), log), [], set()
    for batch in loader:
        with amp:
            maps, scores = predict_maps(model, batch["image"].to(device, non_blocking=True), zero_shot)
        maps, scores = maps.cpu().numpy(), scores.cpu()
        for i, path in enumerate(batch["path"]):
            name, k = Path(path).stem, 1
            while name in used:  # same file name in two folders
                k += 1
                name = f"{Path(path).stem}_{k}"
            used.add(name)
            if heat_dir:
                lo, hi = heat_range or (float(maps[i].min()), float(maps[i].max()))
                Image.fromarray(picture(to_rgb(batch["image"][i]), maps[i], lo, hi)).save(heat_dir / f"{name}.png")
            rows.append((path, float(scores[i]), f"{name}.png"))
        progress.step(len(scores), "images")
    if out_dir:
        with open(Path(out_dir) / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "score", "heatmap"])
            w.writerows((p, repr(s), h) for p, s, h in rows)
    log(f"scored {len(rows)} images, {progress.rate():.1f} img/s")
    return rows


# -----------------------------------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a one-line error and exit status 2 through guard(), like every other bad input
        raise CliError(f"{message} (see --help)")


def parse_args(argv=None):
    doc = __doc__.split("\n\n")
    p = Parser(description=doc[0], epilog="examples:\n" + "\n\n".join(doc[1:4]),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="project checkpoint (.safetensors), official state dict (model.pth or .safetensors), or "
                        "the folder of a single-class run (<out>/<class>/model.safetensors)")
    add_data_args(p)
    p.add_argument("--out", type=Path, help="output folder (default: <checkpoint folder>/eval, or eval-<data>, "
                                            "-zero-shot, -full-res for those protocols; predictions for --images)")
    p.add_argument("--zero-shot", action="store_true",
                   help="anomaly map = INP distance (paper's zero-shot protocol, e.g. a Real-IAD model on MVTec)")
    p.add_argument("--full-res", action="store_true",
                   help="pixel metrics at each image's original resolution over the centre-crop region (the "
                        "MVTec AD protocol; the border outside the crop is not scored)")
    p.add_argument("--streaming", action="store_true",
                   help="pixel metrics from 65536-bin histograms (constant memory; error bounds in metrics.json)")
    p.add_argument("--map-dtype", choices=["float32", "float16"], default="float32",
                   help="storage of maps for exact metrics; float16 halves memory but rounds the scores "
                        "(metrics can move); default float32")
    p.add_argument("--save-maps", type=int, default=0, metavar="N",
                   help="per class, pictures of the N most and N least anomalous test images")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="score these images or folders (no labels): predictions.csv + heatmaps/*.png")
    p.add_argument("--heat-range", nargs=2, type=float, metavar=("LO", "HI"),
                   help="--images: colour every heat-map on this fixed range (default: each image's min..max)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="CUDA autocast dtype (default fp32, as the official evaluation); the CPU always runs fp32")
    args = p.parse_args(argv)
    for name in ("batch_size", "image_size", "crop_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.workers is not None and args.workers < 0:
        raise CliError(f"--workers must be at least 0, got {args.workers}")
    if args.save_maps < 0:
        raise CliError(f"--save-maps must be at least 0, got {args.save_maps}")
    if args.images and (args.full_res or args.streaming or args.save_maps):
        raise CliError("--images scores unlabelled images: --full-res, --streaming and --save-maps need a test set")
    if args.streaming and args.map_dtype != "float32":
        raise CliError("--map-dtype applies to exact metrics; --streaming keeps no maps")
    return args


def _split(value):
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(s).strip() for s in items if str(s).strip()]


def checkpoint_files(path):
    """[model file]: the file itself, <dir>/model.safetensors, or every <dir>/<class>/model.safetensors."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return [p / "model.safetensors"]
        found = sorted(p.glob("*/model.safetensors"))
        if not found:
            raise CliError(f"{p}: no model.safetensors in it or in its sub-folders")
        return found
    if not p.exists():
        raise CliError(f"{p}: no such file")
    return [p]


def plan_sets(args, meta, ckpt):
    """[(data, root, classes, trained_on_it)] to evaluate: the command line first, then the checkpoint's
    metadata. A data set the checkpoint was not trained on defaults to all its classes. trained_on_it is None
    for a checkpoint without metadata."""
    trained, trained_roots = _split(meta.get("data")), _split(meta.get("data_root"))
    if len(trained_roots) != len(trained):
        trained_roots = []
    wanted = _split(args.data) or trained
    if not wanted:
        raise CliError(f"{ckpt}: the checkpoint records no data set (the official state dict has no metadata): "
                       "pass --data and --data-root")
    unknown = [d for d in wanted if d not in datasets.DATASETS]
    if unknown:
        raise CliError(f"--data {','.join(unknown)}: unknown data set (known: {', '.join(datasets.DATASETS)})")
    roots = _split(args.data_root)
    if roots and len(roots) != len(wanted):
        raise CliError(f"--data names {len(wanted)} data set(s) but --data-root gives {len(roots)} folder(s)")
    per_set = meta.get("classes_per_set")
    sets = []
    same = lambda a, b: Path(a).resolve() == Path(b).resolve()  # noqa: E731
    for i, d in enumerate(wanted):
        known = d in trained
        k = trained.index(d) if known else None
        if not known and roots and trained_roots:  # another name for the same folder (demo vs folder)
            k = next((j for j, r in enumerate(trained_roots) if same(r, roots[i])), None)
            known = k is not None
        if roots:
            root = roots[i]
        elif known and trained_roots:
            root = trained_roots[k]
            if d != "demo" and not Path(root).is_dir():  # the demo set is rebuilt wherever it is asked for
                raise CliError(f"{root}: not found; {ckpt} was trained on {d} there: pass --data-root where that "
                               "data is now")
        else:
            root = datasets.default_root(d)
            if root is None:
                raise CliError(f"--data {d} needs --data-root (the folder holding the data set)")
        if args.classes:
            classes = args.classes
        elif known and isinstance(per_set, list) and len(per_set) == len(trained):
            classes = per_set[k]
        elif known and len(trained) == 1 and meta.get("classes"):
            classes = meta["classes"]
        else:
            classes = "all"
        sets.append((d, root, classes, known if trained else None))  # None: the checkpoint does not say
    return sets


def default_out(args, ckpt_path, sets):
    base = Path(args.ckpt) if Path(args.ckpt).is_dir() else ckpt_path.parent
    if args.images:
        return base / "predictions"
    name = "eval"
    foreign = [d for d, _, _, known in sets if known is False]
    if foreign:
        name += "-" + "+".join(foreign)
    if args.zero_shot:
        name += "-zero-shot"
    if args.full_res:
        name += "-full-res"
    return base / name


def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    device = pick_device(args.device)
    if args.precision != "fp32" and device.type != "cuda":
        log(f"note: --precision {args.precision} applies on CUDA only; running fp32 on {device}")
    ckpts = checkpoint_files(args.ckpt)
    meta = inpformer.read_checkpoint_metadata(ckpts[0])  # a junk or truncated file fails here, naming itself
    image_size = args.image_size or meta.get("image_size") or 448
    crop_size = args.crop_size or meta.get("crop_size") or 392
    batch_size = args.batch_size or 16
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    common = dict(image_size=image_size, crop_size=crop_size, batch_size=batch_size, device=device,
                  workers=workers, zero_shot=args.zero_shot, precision=args.precision, log=log)

    if args.images:
        if len(ckpts) > 1:
            raise CliError(f"{args.ckpt}: --images needs one model file, not a folder of {len(ckpts)} models")
        files = image_files(args.images)
        model = inpformer.load_model(ckpts[0], device)
        out = args.out or default_out(args, ckpts[0], [])
        log(f"{ckpts[0]}: scoring {len(files)} images at {image_size} -> {crop_size} px on {device}")
        predict_images(model, files, out_dir=out, heat_range=args.heat_range, **common)
        log(f"wrote {out / 'predictions.csv'} and {out / 'heatmaps'}/")
        return 0

    sets = plan_sets(args, meta, ckpts[0])
    trained = _split(meta.get("data"))
    for d, _, _, known in sets:
        if known is False and not args.zero_shot:
            log(f"note: {ckpts[0]} was trained on {','.join(trained)}, not {d}; the paper's zero-shot protocol "
                "uses INP-distance maps: add --zero-shot")
    out = args.out or default_out(args, ckpts[0], sets)
    options = dict(full_res=args.full_res, streaming=args.streaming, save_maps=args.save_maps,
                   map_dtype=args.map_dtype, **common)

    if len(ckpts) > 1:  # a single-class run: each class with its own model, one table
        if any(known is False for *_, known in sets):
            raise CliError(f"{args.ckpt}: a single-class run evaluates each model on its own class; pick one "
                           "model file to evaluate on another data set")
        results = evaluate_single_class_run(ckpts, args, sets, out, options)
        print(markdown_table(results), flush=True)
        log(f"wrote {out}/metrics.json, metrics.csv, metrics.md and per-class folders")
        return 0

    model = inpformer.load_model(ckpts[0], device)
    check_sizes(model, image_size, crop_size)
    for d, root, classes, _ in sets:
        set_out = out / d if len(sets) > 1 else out
        results = evaluate(model, d, root, classes, out_dir=set_out, **options)
        if len(sets) > 1:
            print(f"\n{d}:")
        print(markdown_table(results), flush=True)
        log(f"wrote {set_out}/metrics.json, metrics.csv, metrics.md, image_scores.csv"
            + (", maps/" if args.save_maps else ""))
    return 0


def evaluate_single_class_run(ckpts, args, sets, out, options):
    """Each <class>/model.safetensors on its own class (results in <out>/<class>/), then one table."""
    wanted = set(_split(args.classes))
    parts, used = [], []
    for ckpt in ckpts:
        meta = inpformer.read_checkpoint_metadata(ckpt)
        d = (_split(meta.get("data")) or [sets[0][0]])[0]
        root = (_split(args.data_root) or _split(meta.get("data_root")) or [sets[0][1]])[0]
        classes = _split(meta.get("classes")) or [ckpt.parent.name]
        if wanted and not wanted & set(classes):
            continue
        model = inpformer.load_model(ckpt, options["device"])
        check_sizes(model, options["image_size"], options["crop_size"])
        parts.append(evaluate(model, d, root, [c for c in classes if not wanted or c in wanted],
                              out_dir=out / ckpt.parent.name, **options))
        used.append(str(ckpt))
    if not parts:
        raise CliError(f"{args.ckpt}: no model for --classes {args.classes}")
    results = combine(parts, models=used)
    write_results(results, out)
    return results


if __name__ == "__main__":
    guard(main)
