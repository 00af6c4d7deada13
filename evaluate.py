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

The data arguments default to what the checkpoint's metadata records (data set, root, classes, sizes), so
`--ckpt` alone re-evaluates a model on its own data; the authors' `model.pth` records nothing: give --data and
--data-root. Written under --out (default `eval/` beside the checkpoint; `eval-<data>`, `-zero-shot`,
`-full-res` for the other protocols, so that one never overwrites another): metrics.json, metrics.csv (fractions)
and metrics.md (percent) per class and mean; image_scores.csv; with --save-maps N, maps/<class>/{most,least}_NN_*.png
(image | ground truth | heat-map overlay); with --images, predictions.csv and heatmaps/*.png.

Protocol (the official `evaluation_batch(max_ratio=0.01, resize_mask=256)`): maps at the crop size, resized
bilinearly to 256x256, 5x5 Gaussian with sigma 4 and zero padding; image score = mean of the top 1% (655) of
the smoothed pixels; ground truth = the crop-size mask resized to 256 with `nearest`, then > 0.5. Each class is
scored on its own; "mean" is the plain average over classes. Metrics come from metrics.py and are exact, not
the 200-bin approximations of the authors' GPU code (expect pixel AP a little off the paper's numbers).
--full-res (the MVTec AD protocol) scores pixels at each image's own resolution over the part the centre crop
saw: the 256 map resized to that box against the original mask cut to it; the border outside the crop is left
out rather than filled with invented scores. --zero-shot (paper Table S8): the map is the INP distance.

Memory: one class at a time; exact metrics peak at about 2.4x the float32 maps (bench/bench_eval.py: 1725 maps of
256x256, +1.0 GiB). --map-dtype float16 rounds the maps and moves the metrics (~0.015 points): opt-in only.
--streaming keeps 65536-bin histograms over [0, 2] (~0.1 GB whatever the class size) and writes the largest
possible difference from the exact metrics ("error_bounds"). --precision bf16 runs the model in bf16 (also on
CPUs with bf16 units: 2.4x the fp32 forward on an AVX512-BF16 CPU without AMX); maps, scores, metrics stay fp32.
"""
import argparse
import csv
import heapq
import json
import math
import time
import warnings
from dataclasses import dataclass
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
DTYPES = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Options:
    """How to evaluate: preprocessing, batching, device and precision, protocol, outputs."""
    image_size: int = 448
    crop_size: int = 392
    batch_size: int = 16
    device: str = "cpu"
    workers: int = 0
    precision: str = "fp32"  # the model runs in this dtype; maps, scores and metrics are fp32 whatever it is
    zero_shot: bool = False
    full_res: bool = False
    streaming: bool = False
    map_dtype: str = "float32"
    save_maps: int = 0


def prepare(model, opts: Options):
    """The model on the options' device and in their precision, ready to score; checks the sizes."""
    datasets.check_sizes(opts.image_size, opts.crop_size, model.encoder.config.patch_size)
    if opts.precision == "fp16" and torch.device(opts.device).type != "cuda":
        raise ValueError("--precision fp16 runs on CUDA only (use bf16 on a CPU)")
    return model.to(opts.device, DTYPES[opts.precision]).eval()


def predict_maps(model, x, zero_shot=False):
    """(B, 3, c, c) preprocessed images -> (B, 256, 256) smoothed float32 maps and (B,) image scores, on the
    official protocol: reconstruction error, or with zero_shot the INP distance. x is cast to the model's dtype."""
    predict = model.predict_zero_shot if zero_shot else model.predict
    with torch.inference_mode():
        maps, scores = predict(x.to(model.prototype_token.dtype), out_size=EVAL_SIZE, max_ratio=MAX_RATIO)
    return maps.float(), scores.float()


# -----------------------------------------------------------------------------------------------------
# Accumulating and scoring one class


class ClassScores:
    """Image labels and scores and pixel masks and maps of one class, added batch by batch; then the seven
    metrics.

    Exact (default): maps go into one preallocated (N, H, W) buffer (float32, or float16 on request) and masks
    into a bool one, and metrics.compute_all ranks them exactly. Streaming: masks and maps only update a
    metrics.PixelHistogram, whose memory does not grow; image scores are always kept exactly (N floats).
    pixels=False (a class without masks): image metrics only, the pixel ones None."""

    def __init__(self, n, streaming=False, map_dtype=torch.float32, pixels=True):
        self.n, self.count, self.pixels = n, 0, pixels
        self.labels = torch.zeros(n, dtype=torch.bool)
        self.scores = torch.zeros(n, dtype=torch.float32)
        self.hist = metrics.PixelHistogram() if streaming and pixels else None
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
        if not self.pixels:
            return
        if self.hist is not None:
            for m, s in (zip(masks, maps) if isinstance(maps, list) else [(masks, maps)]):
                self.hist.update(m, s)
            return
        shapes = {tuple(s.shape) for s in maps} if isinstance(maps, list) else {tuple(maps.shape[1:])}
        if self.maps is None and len(shapes) == 1:
            self.maps = torch.empty((self.n, *next(iter(shapes))), dtype=self.map_dtype)
            self.masks = torch.empty(self.maps.shape, dtype=torch.bool)
        if self.maps is None or shapes - {tuple(self.maps.shape[1:])}:
            raise ValueError(f"test images of one class have different sizes ({', '.join(map(str, sorted(shapes)))}); "
                             "exact --full-res needs one size per class, use --streaming")
        self.maps[i:i + b] = torch.stack(maps) if isinstance(maps, list) else maps
        self.masks[i:i + b] = torch.stack(list(masks)) if isinstance(maps, list) else masks

    def compute(self, warn=None):
        """{metric: float} in METRICS order; undefined metrics are NaN (warn(message) says why), absent ones None."""
        if self.count != self.n:
            raise ValueError(f"{self.count} of {self.n} images were added")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", metrics.UndefinedMetricWarning)
            if self.hist is None and self.pixels:
                result = metrics.compute_all(self.labels, self.scores, self.masks, self.maps, fpr_limit=FPR_LIMIT)
            else:
                result = {"I-AUROC": metrics.auroc(self.labels, self.scores),
                          "I-AP": metrics.average_precision(self.labels, self.scores),
                          "I-F1max": metrics.f1_max(self.labels, self.scores),
                          **(self.hist.compute(fpr_limit=FPR_LIMIT) if self.hist else {})}
        for w in caught:  # one log line each instead of python's two-line warning format
            if warn:
                warn(str(w.message))
        return {k: float(result[k]) if k in result else None for k in METRICS}


# -----------------------------------------------------------------------------------------------------
# Pictures


def heat_colors(v):
    """Values in [0, 1] -> "jet" colours, (H, W) -> (H, W, 3) uint8."""
    v = np.clip(np.nan_to_num(v), 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def to_rgb(x, size=EVAL_SIZE):
    """A preprocessed (3, c, c) image back to (size, size, 3) uint8, as the model saw it."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (datasets.IMAGENET_MEAN, datasets.IMAGENET_STD))
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def picture(image, amap, lo, hi, mask=None):
    """image | [ground truth |] heat-map overlay, side by side: (H, 2W or 3W, 3) uint8. The map is coloured on
    the fixed range [lo, hi], so that pictures sharing a range can be compared."""
    heat = heat_colors((np.asarray(amap, np.float64) - lo) / max(hi - lo, 1e-12))
    overlay = (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32) + 0.5).astype(np.uint8)
    panels = [image] + ([np.repeat(np.asarray(mask, np.uint8)[..., None] * 255, 3, axis=2)] if mask is not None else [])
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
        order, item = -self.seen, None
        self.seen += 1
        for heap, key in ((self.most, score), (self.least, -score)):
            if len(heap) < self.n or (key, order) > heap[0][:2]:
                item = item or make_item()
                (heapq.heappush if len(heap) < self.n else heapq.heapreplace)(heap, (key, order, item))

    def write(self, folder):
        """most_01_*.png (highest score first) and least_01_*.png (lowest first), on one colour range."""
        kept = [e[2] for e in self.most + self.least]
        if kept:
            folder.mkdir(parents=True, exist_ok=True)
            lo, hi = min(float(i["map"].min()) for i in kept), max(float(i["map"].max()) for i in kept)
        for name, heap in (("most", self.most), ("least", self.least)):
            for rank, (_, _, item) in enumerate(sorted(heap, reverse=True), start=1):
                path = folder / f"{name}_{rank:02d}_{_file_stem(item['path'])}.png"
                Image.fromarray(picture(item["image"], item["map"], lo, hi, item["mask"])).save(path)


# -----------------------------------------------------------------------------------------------------
# Evaluation


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
                     f"ETA {datasets.format_time((self.total - self.done) / rate)}")

    def rate(self):
        return self.done / max(time.monotonic() - self.start, 1e-9)


def combine(parts, **protocol):
    """One results dict (classes, mean, counts) from the results of disjoint sets of classes, e.g. the models
    of a single-class run. The mean is over classes; None (absent) where any class lacks the metric."""
    per_class, counts = {}, {}
    for r in parts:
        per_class.update(r["classes"])
        counts.update(r["counts"])
    values = {k: [m[k] for m in per_class.values()] for k in METRICS}
    mean = {k: None if None in v else float(np.mean(v)) for k, v in values.items()}
    results = dict(classes=per_class, mean=mean, counts=counts, protocol=dict(parts[-1]["protocol"], **protocol))
    bounds = {c: b for r in parts for c, b in r.get("error_bounds", {}).items()}
    return dict(results, error_bounds=bounds) if bounds else results


def evaluate(model, data, root, classes, opts=Options(), out_dir=None, log=print):
    """The seven metrics of `model` on the test sets of `classes` ("all", "a,b" or a list) of one data set.

    Returns {"classes": {class: {metric: value}}, "mean": {metric: value}, "counts": ..., "protocol": ...}
    (fractions; NaN where undefined, None where absent: pixel metrics of a class without masks; streaming adds
    "error_bounds"). Writes nothing unless out_dir is given: then metrics.json/.csv/.md, image_scores.csv, and
    with opts.save_maps=N the pictures under maps/<class>/. log receives progress lines."""
    model = prepare(model, opts)
    if opts.map_dtype not in ("float32", "float16") or (opts.streaming and opts.map_dtype != "float32"):
        raise ValueError(f"--map-dtype {opts.map_dtype}: use float32 or float16, and float32 with --streaming")
    classes = datasets.resolve_classes(data, root, classes)
    # Build every test set first: their pre-flight file checks fail now, not an hour into the run.
    test_sets = {c: datasets.test_set(data, root, c, opts.image_size, opts.crop_size, native=opts.full_res)
                 for c in classes}
    total = sum(len(ds) for ds in test_sets.values())
    log(f"{data}: {len(classes)} classes, {total} test images, {opts.image_size} -> {opts.crop_size} px, "
        f"{'INP distance (zero-shot)' if opts.zero_shot else 'reconstruction error'} maps, pixels at "
        f"{'original resolution' if opts.full_res else f'{EVAL_SIZE}x{EVAL_SIZE}'}, "
        f"{'streaming' if opts.streaming else 'exact'} metrics, {opts.device} {opts.precision}")
    progress = Progress(total, log)
    per_class, counts, bounds, rows = {}, {}, {}, []
    for cls, ds in test_sets.items():
        t0 = time.monotonic()
        pixels = not any(s.label and s.mask is None for s in ds.samples)
        if not pixels:
            log(f"  note: {cls}: no ground_truth/ masks, so image metrics only")
        loader = torch.utils.data.DataLoader(ds, batch_size=opts.batch_size, num_workers=opts.workers,
                                             pin_memory=torch.device(opts.device).type == "cuda", collate_fn=ds.collate)
        acc = ClassScores(len(ds), opts.streaming, getattr(torch, opts.map_dtype), pixels)
        gallery = Gallery(opts.save_maps if out_dir else 0)
        for batch in loader:
            maps, scores = (t.cpu() for t in predict_maps(model, batch["image"].to(opts.device), opts.zero_shot))
            masks = F.interpolate(batch["mask"], size=(EVAL_SIZE, EVAL_SIZE), mode="nearest")[:, 0] > 0.5
            if opts.full_res:  # the 256 maps resized to each native mask's box
                native = batch["native_mask"]
                big = [F.interpolate(m[None, None], size=t.shape, mode="bilinear", align_corners=False)[0, 0]
                       for m, t in zip(maps, native)]
                acc.add(batch["label"], scores, native, big)
            else:
                acc.add(batch["label"], scores, masks, maps)
            for i, path in enumerate(batch["path"]):
                rows.append((cls, path, int(batch["label"][i]), float(scores[i])))
                gallery.offer(float(scores[i]), lambda i=i, path=path: dict(
                    image=to_rgb(batch["image"][i]), mask=masks[i].numpy(), map=maps[i].numpy(), path=path))
            progress.step(len(scores), cls)
        m = per_class[cls] = acc.compute(warn=lambda msg, cls=cls: log(f"  note: {cls}: {msg}"))
        n_bad = int(acc.labels.sum())
        counts[cls] = {"normal": len(ds) - n_bad, "anomalous": n_bad}
        if acc.hist:
            bounds[cls] = acc.hist.error_bounds(fpr_limit=FPR_LIMIT)
        if out_dir:
            gallery.write(Path(out_dir) / "maps" / cls)
        log(f"  {cls}: {len(ds)} images ({n_bad} anomalous) in {time.monotonic() - t0:.1f}s; "
            + " ".join(f"{k} {_cell(m[k])}" for k in METRICS)
            + (f"; binning error <= {100 * max(bounds[cls].values()):.3f} points" if cls in bounds else ""))
    log(f"{data}: {total} images, {progress.rate():.1f} img/s")
    protocol = dict(data=data, root=str(root), image_size=opts.image_size, crop_size=opts.crop_size,
                    maps="inp-distance" if opts.zero_shot else "reconstruction",
                    pixels="original" if opts.full_res else EVAL_SIZE, gaussian_sigma=4, max_ratio=MAX_RATIO,
                    fpr_limit=FPR_LIMIT, precision=opts.precision,
                    metrics=f"streaming ({metrics.PixelHistogram().bins} bins over [0, 2])" if opts.streaming
                    else f"exact ({opts.map_dtype} maps)")
    results = combine([dict(classes=per_class, counts=counts, protocol=protocol, error_bounds=bounds)])
    if out_dir:
        write_results(results, out_dir, rows)
    return results


# -----------------------------------------------------------------------------------------------------
# Output


def _cell(v):
    return "—" if v is None else "n/a" if math.isnan(v) else f"{100 * v:.1f}"


def markdown_table(results) -> str:
    """Each class, then "mean"; the paper's columns; percent with one decimal ("n/a" where undefined, "—"
    where absent)."""
    lines = ["| class | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, m in [*results["classes"].items(), ("mean", results["mean"])]:
        lines.append(f"| {name} | " + " | ".join(_cell(m[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def _json_safe(x):  # JSON has no NaN: undefined metrics are written as null
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def write_results(results, out_dir, image_rows=None):
    """metrics.json, metrics.csv (class, then the seven metrics as fractions), metrics.md, image_scores.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    rows = [[name, *("" if m[k] is None else repr(m[k]) for k in METRICS)]
            for name, m in [*results["classes"].items(), ("mean", results["mean"])]]
    _write_csv(out / "metrics.csv", ["class", *METRICS], rows)
    (out / "metrics.md").write_text(markdown_table(results) + "\n")
    if image_rows is not None:
        _write_csv(out / "image_scores.csv", ["class", "path", "label", "score"],
                   [(c, p, label, repr(s)) for c, p, label, s in image_rows])


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# -----------------------------------------------------------------------------------------------------
# Predictions on new images


def image_files(specs):
    """Image files named by `specs` (files, or folders searched recursively, hidden entries skipped), sorted
    within each folder."""
    files = []
    for spec in map(Path, specs):
        if spec.is_dir():
            files += sorted(q for q in spec.rglob("*") if q.suffix.lower() in datasets.IMAGE_SUFFIXES and q.is_file()
                            and not any(part.startswith(".") for part in q.relative_to(spec).parts))
        elif spec.is_file():
            files.append(spec)
        else:
            raise ValueError(f"{spec}: no such file or folder")
    if not files:
        raise ValueError(f"{', '.join(map(str, specs))}: no images ({', '.join(datasets.IMAGE_SUFFIXES)})")
    return files


def predict_images(model, files, opts=Options(), out_dir=None, heat_range=None, log=print):
    """Score unlabelled images: [(path, score, heat-map file name)], and with out_dir predictions.csv and
    heatmaps/<name>.png (image | overlay, 512x256). The overlay is coloured on heat_range (lo, hi) when given
    (use it to compare images), else on each image's own min..max, as the official visualisation does."""
    model = prepare(model, opts)
    samples = [datasets.Sample(str(f), None, 0, "", "") for f in files]
    loader = torch.utils.data.DataLoader(datasets.ImageDataset(samples, opts.image_size, opts.crop_size),
                                         batch_size=opts.batch_size, num_workers=opts.workers)
    heat_dir = Path(out_dir) / "heatmaps" if out_dir else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)
    progress, rows, used = Progress(len(files), log), [], set()
    for batch in loader:
        maps, scores = (t.cpu() for t in predict_maps(model, batch["image"].to(opts.device), opts.zero_shot))
        for i, path in enumerate(batch["path"]):
            name, k = Path(path).stem, 1
            while name in used:  # same file name in two folders
                k += 1
                name = f"{Path(path).stem}_{k}"
            used.add(name)
            if heat_dir:
                lo, hi = heat_range or (float(maps[i].min()), float(maps[i].max()))
                pic = picture(to_rgb(batch["image"][i]), maps[i].numpy(), lo, hi)
                Image.fromarray(pic).save(heat_dir / f"{name}.png")
            rows.append((path, float(scores[i]), f"{name}.png"))
        progress.step(len(scores), "images")
    if out_dir:
        _write_csv(Path(out_dir) / "predictions.csv", ["path", "score", "heatmap"],
                   [(p, repr(s), h) for p, s, h in rows])
    log(f"scored {len(rows)} images, {progress.rate():.1f} img/s")
    return rows


# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    doc = __doc__.split("\n\n")
    p = datasets.Parser(description=doc[0], epilog="examples:\n" + doc[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="project checkpoint (.safetensors), official state dict (model.pth or .safetensors), or "
                        "the folder of a run (<out>/model.safetensors or <out>/<class>/model.safetensors)")
    datasets.add_args(p)
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
    p.add_argument("--save-maps", type=datasets.number(low=0), default=0, metavar="N",
                   help="per class, pictures of the N most and N least anomalous test images")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="score these images or folders (no labels): predictions.csv + heatmaps/*.png")
    p.add_argument("--heat-range", nargs=2, type=float, metavar=("LO", "HI"),
                   help="--images: colour every heat-map on this fixed range (default: each image's min..max)")
    args = p.parse_args(argv)
    if args.images and (args.full_res or args.streaming or args.save_maps):
        raise ValueError("--images scores unlabelled images: --full-res, --streaming and --save-maps need a test set")
    if args.streaming and args.map_dtype != "float32":
        raise ValueError("--map-dtype applies to exact metrics; --streaming keeps no maps")
    return args


def checkpoint_files(path):
    """[model file]: the file itself, <dir>/model.safetensors, or every <dir>/<class>/model.safetensors."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("model.safetensors")) or sorted(p.glob("*/model.safetensors"))
        if not found:
            raise ValueError(f"{p}: no model.safetensors in it or in its sub-folders")
        return found
    if not p.exists():
        raise ValueError(f"{p}: no such file")
    return [p]


def plan_sets(args, meta, ckpt):
    """[(data, root, classes, own)] to evaluate: the command line first, then the checkpoint's metadata. own:
    the checkpoint was trained on that data (by name, or the same folder under another name), None when the
    checkpoint does not say. Another data set defaults to all its classes."""
    split = datasets._split
    trained, trained_roots, per_set = split(meta.get("data")), split(meta.get("data_root")), meta.get("classes_per_set")
    if not isinstance(per_set, list) or len(per_set) != len(trained):
        per_set = [meta.get("classes") or "all"] if len(trained) == 1 else ["all"] * len(trained)
    wanted, roots = split(args.data) or trained, split(args.data_root)
    if not wanted:
        raise ValueError(f"{ckpt}: the checkpoint records no data set (the official state dict has no metadata): "
                         "pass --data and --data-root")
    if roots and len(roots) != len(wanted):
        raise ValueError(f"--data names {len(wanted)} data set(s) but --data-root gives {len(roots)} folder(s)")
    sets = []
    for i, d in enumerate(wanted):
        k = trained.index(d) if d in trained else next(
            (j for j, r in enumerate(trained_roots) if roots and Path(r).resolve() == Path(roots[i]).resolve()), None)
        own = k is not None and k < len(trained_roots)
        root = roots[i] if roots else trained_roots[k] if own else datasets.default_root(d)
        if root is None:
            raise ValueError(f"--data {d} needs --data-root (the folder holding the data set)")
        if not roots and own and not Path(root).is_dir():
            raise ValueError(f"{root}: not found; {ckpt} was trained on {d} there: pass --data-root where it is now")
        classes = args.classes or (per_set[k] if k is not None else "all")
        sets.append((d, root, classes, None if not trained else k is not None))
    return sets


def default_out(args, ckpt, sets):
    base = Path(args.ckpt) if Path(args.ckpt).is_dir() else ckpt.parent
    foreign = "".join(f"-{d}" for d, *_, own in sets if own is False)
    return base / ("predictions" if args.images else
                   f"eval{foreign}{'-zero-shot' if args.zero_shot else ''}{'-full-res' if args.full_res else ''}")


def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    ckpts = checkpoint_files(args.ckpt)
    meta = inpformer.read_checkpoint_metadata(ckpts[0])  # a junk or truncated file fails here, naming itself
    first = inpformer.load_model(ckpts[0])  # and a file that is no INP-Former checkpoint here
    opts = Options(image_size=args.image_size or meta.get("image_size") or 448,
                   crop_size=args.crop_size or meta.get("crop_size") or 392, batch_size=args.batch_size or 16,
                   device=str(datasets.device(args.device)), workers=datasets.workers(args.workers),
                   precision="fp32" if args.precision == "auto" else args.precision, zero_shot=args.zero_shot,
                   full_res=args.full_res, streaming=args.streaming, map_dtype=args.map_dtype, save_maps=args.save_maps)
    if args.images:
        if len(ckpts) > 1:
            raise ValueError(f"{args.ckpt}: --images needs one model file, not a folder of {len(ckpts)} models")
        files, out = image_files(args.images), args.out or default_out(args, ckpts[0], [])
        log(f"{ckpts[0]}: scoring {len(files)} images at {opts.image_size} -> {opts.crop_size} px on {opts.device}")
        predict_images(first, files, opts, out, args.heat_range, log)
        log(f"wrote {out / 'predictions.csv'} and {out / 'heatmaps'}/")
        return 0

    sets = plan_sets(args, meta, ckpts[0])
    for d, _, _, own in sets:
        if own is False and not args.zero_shot:
            log(f"note: {ckpts[0]} was trained on {meta.get('data')}, not {d}; the paper's zero-shot protocol "
                "uses INP-distance maps: add --zero-shot")
    if len(ckpts) > 1 and any(own is False for *_, own in sets):
        raise ValueError(f"{args.ckpt}: a single-class run evaluates each model on its own class; pick one "
                         "model file to evaluate on another data set")
    out = args.out or default_out(args, ckpts[0], sets)
    jobs = []  # (model file, data set, root, classes, output folder, table)
    if len(ckpts) == 1:
        names = [d if [s[0] for s in sets].count(d) == 1 else f"{d}{i + 1}" for i, (d, *_) in enumerate(sets)]
        jobs = [(ckpts[0], d, r, c, out / n if len(sets) > 1 else out, n) for (d, r, c, _), n in zip(sets, names)]
    wanted, split = set(datasets._split(args.classes)), datasets._split
    for ckpt in ckpts if len(ckpts) > 1 else []:  # a single-class run: each model on its own classes (those asked for)
        m = inpformer.read_checkpoint_metadata(ckpt)
        classes = [c for c in split(m.get("classes")) or [ckpt.parent.name] if not wanted or c in wanted]
        if classes:
            jobs.append((ckpt, (split(m.get("data")) or [sets[0][0]])[0],
                         (split(args.data_root) or split(m.get("data_root")) or [sets[0][1]])[0], classes,
                         out / ckpt.parent.name, "all"))
    if not jobs:
        raise ValueError(f"{args.ckpt}: no model for --classes {args.classes}")
    results = {}
    for ckpt, d, root, classes, sub, table in jobs:
        model = first if ckpt == ckpts[0] else inpformer.load_model(ckpt)
        results.setdefault(table, []).append(evaluate(model, d, root, classes, opts, sub, log))
    for table, parts in results.items():
        merged = combine(parts, **({"models": [str(j[0]) for j in jobs]} if len(ckpts) > 1 else {}))
        if len(parts) > 1:
            write_results(merged, out)
        print(("" if len(results) == 1 else f"\n{table}:\n") + markdown_table(merged), flush=True)
    log(f"wrote {out}/metrics.json, metrics.csv, metrics.md" + (", image_scores.csv" if len(ckpts) == 1 else "")
        + (", maps/" if args.save_maps else ""))
    return 0


if __name__ == "__main__":
    datasets.guard(main)
