"""Evaluate INP-Former: the paper's seven metrics per class, a calibrated decision rule, pictures, scores and
decisions for new images, and an ONNX export of the scoring path.

    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors           # on the data it was trained on
    python evaluate.py --ckpt model.pth --data mvtec --data-root /data/mvtec_anomaly_detection   # authors' weights
    python evaluate.py --ckpt runs/realiad-multi/model.safetensors --data mvtec --data-root /data/mvtec --zero-shot
    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors --save-maps 5  # + 5 most/least anomalous per class
    python evaluate.py --ckpt runs/mvtec-single                   # a single-class run: each class with its own model
    python evaluate.py --ckpt runs/realiad-multi/model.safetensors --streaming  # bounded memory on Real-IAD
    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors --full-res     # pixel metrics at native resolution
    python evaluate.py --ckpt runs/line7/model.safetensors --data-root held_out/ --calibrate  # store a decision rule
    python evaluate.py --ckpt runs/line7/model.safetensors --images new_parts/  # scores, decisions, heat maps
    python evaluate.py --ckpt runs/line7/model.safetensors --export line7.onnx  # anomaly_map, score [, normalised]

Data arguments default to the checkpoint's metadata (data set, root, classes, sizes); the authors' `model.pth`
records none: give --data and --data-root. Written under --out (default `eval/` beside the checkpoint; `eval-<data>`,
`-zero-shot`, `-full-res` for the other protocols): metrics.json (with the F1-max thresholds and the calibration),
metrics.csv (fractions), metrics.md (percent), image_scores.csv; --save-maps N: maps/<class>/{most,least}_NN_*.png;
--images: predictions.csv and heatmaps/*.png.

Protocol (the official `evaluation_batch(max_ratio=0.01, resize_mask=256)`): maps at the crop size, resized
bilinearly to 256x256, 5x5 Gaussian with sigma 4 and zero padding; image score = mean of the top 1% (655) of
the smoothed pixels; ground truth = the crop-size mask resized to 256 with `nearest`, then > 0.5. Each class is
scored on its own; "mean" is the plain average over classes. Metrics come from metrics.py and are exact, not
the 200-bin approximations of the authors' GPU code (expect pixel AP a little off the paper's numbers).
--full-res (the MVTec AD protocol) scores pixels at each image's own resolution over the part the centre crop
saw. --zero-shot (paper Table S8): the map is the INP distance. Memory: one class at a time; exact metrics peak
at about 2.4x the float32 maps; --map-dtype float16 halves that and moves the metrics (~0.015 points);
--streaming keeps 65536-bin histograms (~0.1 GB) and writes its largest possible error ("error_bounds").
--precision bf16 runs the model in bf16, also on CPUs with bf16 units; maps, scores, metrics stay fp32.
"""
import argparse
import contextlib
import copy
import csv
import dataclasses
import io
import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data as datasets  # the module; `data` is the name of a data set in the functions below
import inpformer
import metrics

METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")  # the paper's column order
EVAL_SIZE = 256  # official resize_mask
MAX_RATIO = 0.01  # image score: mean of the top 1% of the map's pixels
FPR_LIMIT = 0.3  # AUPRO integration limit
DTYPES = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

@dataclasses.dataclass
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
    calibration: dict = None  # the checkpoint's (see calibration()): decisions, heat-map scale and outline
    outline: bool = False  # pictures: draw the edge of the region above the calibrated pixel threshold
    heat_range: tuple = None  # pictures: colour maps on this (lo, hi) instead of the calibration's scale

def prepare(model, opts: Options):
    """The model on the options' device and in their precision, ready to score; checks the sizes."""
    datasets.check_sizes(opts.image_size, opts.crop_size, model.encoder.config.patch_size)
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
    metrics. Exact (default): maps and masks go into preallocated (N, H, W) buffers (maps float32, or float16
    on request) that metrics.compute_all ranks exactly. Streaming: they only update a metrics.PixelHistogram,
    whose memory does not grow. Image scores are always exact. pixels=False (no masks): image metrics only."""

    def __init__(self, n, streaming=False, map_dtype=torch.float32, pixels=True):
        self.n, self.count, self.pixels, self.map_dtype = n, 0, pixels, map_dtype
        self.labels, self.scores = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float32)
        self.hist = metrics.PixelHistogram() if streaming and pixels else None
        self.masks = self.maps = None  # allocated at the first batch, once the map size is known

    def add(self, labels, scores, masks, maps):
        """labels, scores: (B,); masks (bool) and maps: (B, H, W) tensors, or lists of (H, W) tensors."""
        b, i = len(scores), self.count
        if i + b > self.n:
            raise ValueError(f"more than the {self.n} images announced")
        self.labels[i:i + b], self.scores[i:i + b] = torch.as_tensor(labels).bool(), torch.as_tensor(scores).float()
        self.count += b
        if self.hist is not None:
            for m, s in (zip(masks, maps) if isinstance(maps, list) else [(masks, maps)]):
                self.hist.update(m, s)
        if self.hist is not None or not self.pixels:
            return
        shapes = {tuple(s.shape) for s in maps}
        if self.maps is None and len(shapes) == 1:
            self.maps = torch.empty((self.n, *next(iter(shapes))), dtype=self.map_dtype)
            self.masks = torch.empty(self.maps.shape, dtype=torch.bool)
        if self.maps is None or shapes - {tuple(self.maps.shape[1:])}:
            raise ValueError(f"test images of one class have different sizes ({', '.join(map(str, sorted(shapes)))}); "
                             "exact --full-res needs one size per class, use --streaming")
        self.maps[i:i + b], self.masks[i:i + b] = torch.stack(list(maps)), torch.stack(list(masks))

    def compute(self, warn=lambda message: None):
        """{metric: float} in METRICS order, then the F1-max thresholds "I-threshold" and "P-threshold";
        undefined values are NaN (warn(message) says why), absent ones None."""
        if self.count != self.n:
            raise ValueError(f"{self.count} of {self.n} images were added")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", metrics.UndefinedMetricWarning)
            if self.hist is None and self.pixels:
                result = metrics.compute_all(self.labels, self.scores, self.masks, self.maps, FPR_LIMIT, True)
            else:
                f1, t = metrics.f1_threshold(self.labels, self.scores)
                result = {"I-AUROC": metrics.auroc(self.labels, self.scores),
                          "I-AP": metrics.average_precision(self.labels, self.scores), "I-F1max": f1,
                          **(self.hist.compute(FPR_LIMIT, thresholds=True) if self.hist else {}), "I-threshold": t}
        for w in caught:  # one log line each instead of python's two-line warning format
            warn(str(w.message))
        return {k: float(result[k]) if k in result else None for k in (*METRICS, "I-threshold", "P-threshold")}

def calibration(labels, scores, hist, sigmas=3.0):
    """The decision rule of a checkpoint, from labelled images of its classes (pooled): labels, scores (N,),
    and hist, a metrics.PixelHistogram of their 256x256 maps (anomalous pixels where masks say so).

    Thresholds: where F1 is maximal (the I-F1max and P-F1max points) when the images include anomalies (their
    masks, for pixels); else, from normal images alone, mean + 3 std of the normal scores (pixels). The
    normalised score is anomalib's, clip((score - threshold) / (max - min) + 0.5, 0, 1) over the calibration
    scores, so 0.5 is the threshold. Heat maps are coloured from the median normal pixel (cool) to as far above
    the pixel threshold as the threshold is above it (hot), the threshold half way (should the threshold not
    be above the median: to 6 std above it)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    normal, weights = scores[~labels], hist.normal / hist.normal.sum()  # normal pixels per bin, as fractions
    centres = hist.lo + (np.arange(hist.bins) + 0.5) * hist.resolution
    p_mean, p_median = float(weights @ centres), float(centres[np.searchsorted(np.cumsum(weights), 0.5)])
    p_std = float(np.sqrt(weights @ (centres - p_mean) ** 2))
    image_t = metrics.f1_threshold(labels, scores)[1] if labels.any() else normal.mean() + sigmas * normal.std()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixel_t = hist.compute(FPR_LIMIT, True)["P-threshold"] if hist.n_regions else p_mean + sigmas * p_std
    rule = {k: "f1-max" if known else f"normal mean + {sigmas:g} std" for k, known in
            (("image", labels.any()), ("pixel", hist.n_regions > 0))}
    return dict(rule=rule, image_threshold=float(image_t), pixel_threshold=float(pixel_t),
                score_range=[float(scores.min()), float(scores.max())],
                heat_range=[p_median, p_median + 2 * (pixel_t - p_median if pixel_t > p_median else 3 * p_std)],
                normal=dict(images=int(normal.size), score_mean=float(normal.mean()), score_std=float(normal.std()),
                            score_max=float(normal.max()), pixel_median=p_median, pixel_mean=p_mean, pixel_std=p_std),
                anomalous_images=int(labels.sum()))

def normalise(score, calibration, threshold):
    """anomalib's normalised score, (score - threshold) / (max - min) + 0.5 over the calibration scores,
    clipped to [0, 1]: a float for a float, a tensor for a tensor (the exported graph)."""
    lo, hi = calibration["score_range"]
    v = (score - threshold) / max(hi - lo, 1e-12) + 0.5
    return v.clamp(0, 1) if isinstance(v, torch.Tensor) else min(max(float(v), 0.0), 1.0)

def decide(score, calibration, cls=None) -> dict:
    """One image score under a calibration: threshold (the class's if calibrated, else the pooled one),
    normalised score (see normalise) and decision."""
    t = calibration.get("classes", {}).get(cls, calibration["image_threshold"])
    return dict(threshold=t, normalised=normalise(score, calibration, t),
                decision="anomalous" if score >= t else "normal")

def title(path, score, calibration, cls=None):
    verdict = decide(score, calibration, cls) if calibration else None
    return f"{Path(path).name}: score {score:.4g}" + (
        f" ({verdict['normalised']:.2f}) {verdict['decision'].upper()}" if verdict else " (no calibration)")

def heat_scale(opts):
    """(scale, outline) of the pictures: --heat-range, else the calibration's; None: the caller's fallback."""
    cal = opts.calibration
    scale = (*opts.heat_range, "--heat-range") if opts.heat_range else (*cal["heat_range"], "calibration") if cal else None
    return scale, cal["pixel_threshold"] if cal and opts.outline else None

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

def picture(image, amap, scale, title="", mask=None, outline=None) -> Image.Image:
    """image | [ground truth |] heat-map overlay | colour bar, under a title line. scale = (lo, hi, source):
    the map is coloured on this fixed range, so that pictures sharing it compare, and the source is stated on
    the bar. outline: a pixel threshold, whose region's edge is drawn in white (and marked on the bar)."""
    lo, hi, source = scale
    amap, (h, w) = np.asarray(amap, np.float64), image.shape[:2]
    heat = heat_colors((amap - lo) / max(hi - lo, 1e-12))
    overlay = (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32) + 0.5).astype(np.uint8)
    if outline is not None:
        r = amap >= outline  # its edge: pixels of the region (not on the border) with a neighbour outside it
        overlay[1:-1, 1:-1][r[1:-1, 1:-1] & ~(r[:-2, 1:-1] & r[2:, 1:-1] & r[1:-1, :-2] & r[1:-1, 2:])] = 255
    panels = [image] + ([np.repeat(np.asarray(mask, np.uint8)[..., None] * 255, 3, axis=2)] if mask is not None else [])
    x = w * (len(panels) + 1)
    canvas = Image.new("RGB", (x + 84, h + 14), "white")
    canvas.paste(Image.fromarray(np.concatenate(panels + [overlay], axis=1)), (0, 14))
    canvas.paste(Image.fromarray(heat_colors(np.linspace(1, 0, h)[:, None].repeat(12, axis=1))), (x + 4, 14))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    for y, text in ((14, f"{hi:.4g}"), (h + 3, f"{lo:.4g}"), (14 + h // 2 - 16, source[:12]), (14 + h // 2, source[12:24])):
        draw.text((x + 19, y), text, fill="black")
    if outline is not None and lo <= outline <= hi:
        y = 14 + round((hi - outline) / max(hi - lo, 1e-12) * (h - 1))
        draw.line([(x + 2, y), (x + 17, y)], fill="black", width=2)
    return canvas

def _file_stem(path):
    p = Path(path)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{p.parent.name}_{p.stem}")

def save_maps(model, ds, scores, n, folder, opts, cls):
    """Pictures of the n most and n least anomalous images of one class: most_01_* has the highest score,
    least_01_* the lowest (ties: the earlier image). The 2n images are scored again, so that the pass over the
    class keeps no maps. One colour scale: the calibration's, else min..max of these pictures."""
    by_score = sorted(range(len(ds)), key=lambda i: -scores[i])
    picks = [("most", by_score[:n]), ("least", sorted(range(len(ds)), key=lambda i: scores[i])[:n])]
    items = [(name, rank, i, ds[i]) for name, idx in picks for rank, i in enumerate(idx, start=1)]
    maps = [predict_maps(model, item["image"][None].to(opts.device), opts.zero_shot)[0][0].cpu().numpy()
            for *_, item in items]
    scale, outline = heat_scale(opts)
    scale = scale or (min(m.min() for m in maps), max(m.max() for m in maps), "min..max here")
    folder.mkdir(parents=True, exist_ok=True)
    for (name, rank, i, item), amap in zip(items, maps):
        mask = F.interpolate(item["mask"][None], size=(EVAL_SIZE, EVAL_SIZE), mode="nearest")[0, 0] > 0.5
        picture(to_rgb(item["image"]), amap, scale, title(item["path"], float(scores[i]), opts.calibration, cls),
                mask.numpy(), outline).save(folder / f"{name}_{rank:02d}_{_file_stem(item['path'])}.png")

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
    merge = lambda key: {c: v for r in parts for c, v in r.get(key, {}).items()}  # noqa: E731
    per_class, bounds = merge("classes"), merge("error_bounds")
    mean = {k: None if None in (v := [m[k] for m in per_class.values()]) else float(np.mean(v)) for k in METRICS}
    results = dict(classes=per_class, mean=mean, counts=merge("counts"), thresholds=merge("thresholds"),
                   protocol=dict(parts[-1]["protocol"], **protocol),
                   calibration=parts[0]["calibration"] if len(parts) == 1 else None)
    return dict(results, error_bounds=bounds) if bounds else results

def evaluate(model, data, root, classes, opts=Options(), out_dir=None, log=print):
    """The seven metrics of `model` on the test sets of `classes` ("all", "a,b" or a list) of one data set.

    Returns {"classes": {class: {metric: value}}, "mean": {metric: value}, "counts": ..., "protocol": ...,
    "thresholds": {class: {"image": t, "pixel": t}} (the F1-max ones), "calibration": calibration() pooled over
    the classes (None without normal images)} (fractions; NaN where undefined, None where absent: pixel metrics
    of a class without masks; streaming adds "error_bounds"). Writes nothing unless out_dir is given: then
    metrics.json/.csv/.md, image_scores.csv, and with opts.save_maps=N pictures under maps/<class>/."""
    model = prepare(model, opts)
    if opts.map_dtype not in ("float32", "float16") or (opts.streaming and opts.map_dtype != "float32"):
        raise ValueError(f"--map-dtype {opts.map_dtype}: use float32 or float16 (float32 with --streaming, which keeps "
                         "no maps)")
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
    per_class, counts, bounds, thresholds, rows, pooled = {}, {}, {}, {}, [], metrics.PixelHistogram()
    for cls, ds in test_sets.items():
        t0 = time.monotonic()
        pixels = not any(s.label and s.mask is None for s in ds.samples)
        if not pixels:
            log(f"  note: {cls}: no ground_truth/ masks, so image metrics only")
        loader = torch.utils.data.DataLoader(ds, batch_size=opts.batch_size, num_workers=opts.workers,
                                             pin_memory=torch.device(opts.device).type == "cuda", collate_fn=ds.collate)
        acc = ClassScores(len(ds), opts.streaming, getattr(torch, opts.map_dtype), pixels)
        for batch in loader:
            maps, scores = (t.cpu() for t in predict_maps(model, batch["image"].to(opts.device), opts.zero_shot))
            masks = F.interpolate(batch["mask"], size=(EVAL_SIZE, EVAL_SIZE), mode="nearest")[:, 0] > 0.5
            known = batch["label"] >= 0 if pixels else batch["label"] == 0  # pixels whose label is known
            pooled.update(masks[known], maps[known])
            if opts.full_res:  # the maps resized to each native mask's box
                masks = batch["native_mask"]
                maps = [F.interpolate(m[None, None], size=t.shape, mode="bilinear", align_corners=False)[0, 0]
                        for m, t in zip(maps, masks)]
            acc.add(batch["label"], scores, masks, maps)
            rows += [(cls, p, int(y), float(s)) for p, y, s in zip(batch["path"], batch["label"], scores)]
            progress.step(len(scores), cls)
        m = acc.compute(warn=lambda msg, cls=cls: log(f"  note: {cls}: {msg}"))
        per_class[cls] = {k: m[k] for k in METRICS}
        thresholds[cls] = {"image": m["I-threshold"], "pixel": m["P-threshold"]}
        n_bad = int(acc.labels.sum())
        counts[cls] = {"normal": len(ds) - n_bad, "anomalous": n_bad}
        if acc.hist:
            bounds[cls] = acc.hist.error_bounds(fpr_limit=FPR_LIMIT)
        if out_dir and opts.save_maps:
            save_maps(model, ds, acc.scores.tolist(), opts.save_maps, Path(out_dir) / "maps" / cls, opts, cls)
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
    cal = calibration([r[2] for r in rows], [r[3] for r in rows], pooled) if any(r[2] == 0 for r in rows) else None
    if cal:
        cal.update(image_size=opts.image_size, crop_size=opts.crop_size,
                   classes={c: t["image"] for c, t in thresholds.items() if math.isfinite(t["image"])})
    results = combine([dict(classes=per_class, counts=counts, protocol=protocol, error_bounds=bounds,
                            thresholds=thresholds, calibration=cal)])
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

def _json(x, **kw):  # JSON has no NaN: undefined metrics are written as null
    return json.dumps(json.loads(json.dumps(x), parse_constant=lambda _: None), **kw)

def write_results(results, out_dir, image_rows=None):
    """metrics.json, metrics.csv (class, then the seven metrics as fractions), metrics.md, image_scores.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(_json(results, indent=1) + "\n")
    rows = [[name, *("" if m[k] is None else repr(m[k]) for k in METRICS)]
            for name, m in [*results["classes"].items(), ("mean", results["mean"])]]
    _write_csv(out / "metrics.csv", ["class", *METRICS], rows)
    (out / "metrics.md").write_text(markdown_table(results) + "\n")
    if image_rows is not None:
        _write_csv(out / "image_scores.csv", ["class", "path", "label", "score"],
                   [(c, p, label, repr(s)) for c, p, label, s in image_rows])

def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])

# -----------------------------------------------------------------------------------------------------
# Predictions on new images

def image_files(specs):
    """Image files named by `specs` (files, or folders searched recursively, hidden entries skipped), sorted
    within each folder."""
    files = []
    for spec in map(Path, specs):
        if not spec.exists():
            raise ValueError(f"{spec}: no such file or folder")
        files += datasets.images_in(spec, "**/*") if spec.is_dir() else [spec]
    if not files:
        raise ValueError(f"{', '.join(map(str, specs))}: no images ({', '.join(datasets.IMAGE_SUFFIXES)})")
    return files

def predict_images(model, files, opts=Options(), out_dir=None, cls=None, log=print):
    """Score unlabelled images: [dict(path, class, score, and with opts.calibration threshold, normalised,
    decision; heatmap)], and with out_dir predictions.csv and heatmaps/<name>.png. An image takes the threshold
    of `cls`, else of the first calibrated class named in its path, else the pooled one. The heat maps share one
    scale: opts.heat_range, else the calibration's, else min..max over all these images (their maps then wait in
    memory, 0.3 MB each, until all are scored)."""
    model = prepare(model, opts)
    samples = [datasets.Sample(str(f), None, 0, "", "") for f in files]
    loader = torch.utils.data.DataLoader(datasets.ImageDataset(samples, opts.image_size, opts.crop_size),
                                         batch_size=opts.batch_size, num_workers=opts.workers)
    (scale, outline), cal = heat_scale(opts), opts.calibration
    heat_dir = Path(out_dir) / "heatmaps" if out_dir else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)
    draw = lambda p: picture(p[0], p[1].float().numpy(), scale, p[2], outline=outline).save(heat_dir / p[3])  # noqa
    progress, rows, used, waiting = Progress(len(files), log), [], set(), []
    for batch in loader:
        maps, scores = (t.cpu() for t in predict_maps(model, batch["image"].to(opts.device), opts.zero_shot))
        for i, path in enumerate(batch["path"]):
            name, k = Path(path).stem, 1
            while name in used:  # same file name in two folders: _2, _3, ...
                name, k = f"{Path(path).stem}_{k + 1}", k + 1
            used.add(name)
            c = cls or next((p for p in Path(path).parts if cal and p in cal.get("classes", {})), None)
            s = float(scores[i])
            rows.append(dict(path=path, **{"class": c or ""}, score=s, **(decide(s, cal, c) if cal else {}),
                             heatmap=f"{name}.png"))
            if heat_dir:
                waiting.append((to_rgb(batch["image"][i]), maps[i].half(), title(path, s, cal, c), f"{name}.png"))
                if scale:
                    draw(waiting.pop())
        progress.step(len(scores), "images")
    if waiting:
        lo, hi = min(float(p[1].min()) for p in waiting), max(float(p[1].max()) for p in waiting)
        scale = (lo, hi, f"min..max of {len(waiting)} images")
        for p in waiting:
            draw(p)
    if out_dir:  # without a calibration normalised_score and decision stay empty
        cols = ("path", "class", "score", "normalised", "decision", "heatmap")
        _write_csv(Path(out_dir) / "predictions.csv", [c.replace("normalised", "normalised_score") for c in cols],
                   [[r.get(k, "") for k in cols] for r in rows])
    n_bad = sum(r.get("decision") == "anomalous" for r in rows)
    log(f"scored {len(rows)} images, {progress.rate():.1f} img/s; " + (
        f"{n_bad} anomalous, {len(rows) - n_bad} normal (pooled threshold {cal['image_threshold']:.4g}, "
        f"{cal['rule']['image']})" if cal else "no decisions: the checkpoint has no calibration (add one with "
        "evaluate.py --calibrate)"))
    return rows

class Scorer(torch.nn.Module):
    """model.predict at one input size as one exportable graph: the interpolated position table becomes a
    constant (the bicubic interpolation does not export), and a calibration adds the normalised score."""

    def __init__(self, model, crop_size, calibration=None):
        super().__init__()
        self.model, self.calibration = copy.deepcopy(model).float().eval(), calibration
        enc, g = self.model.encoder, crop_size // model.encoder.config.patch_size
        with torch.no_grad():
            enc.pos_embed = torch.nn.Parameter(enc.interpolate_pos_encoding(g, g))
        enc.config = dataclasses.replace(enc.config, pos_grid=g)

    def forward(self, x):
        maps, scores = self.model.predict(x, out_size=EVAL_SIZE, max_ratio=MAX_RATIO)
        cal = self.calibration
        return (maps, scores, normalise(scores, cal, cal["image_threshold"])) if cal else (maps, scores)

def export_onnx(model, path, opts, images=None, log=print):
    """Write the scoring path as ONNX: input "image", a float32 (B, 3, crop, crop) batch preprocessed as
    data.load_image does, B dynamic; outputs "anomaly_map" (B, 256, 256), "score" (B,) and, with a calibration,
    "normalised_score". Then checks every output: onnxruntime against PyTorch on 3 images (the first of
    `images`, topped up with seeded random ones) at batch 1 and 3."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter's back end)
    except ImportError:
        raise ValueError("--export needs the optional packages onnx, onnxscript and onnxruntime: "
                         "pip install onnx onnxscript onnxruntime") from None
    if Path(path).exists():
        raise ValueError(f"{path}: exists; not replacing it")
    # the graph is fp32 whatever --precision says: a model cast to bf16 first would lose its weights' precision
    cpu = dataclasses.replace(opts, device="cpu", precision="fp32")
    scorer, c = Scorer(prepare(model, cpu), opts.crop_size, opts.calibration), opts.crop_size
    names = ["anomaly_map", "score"] + (["normalised_score"] if opts.calibration else [])
    x = torch.randn(3, 3, c, c, generator=torch.Generator().manual_seed(0))
    for i, f in enumerate(image_files(images)[:3] if images else []):  # the given images first
        x[i] = datasets.load_image(f, opts.image_size, c)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with inpformer.atomic_write(path) as tmp:  # checked before it is named `path`
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(scorer, (x[:2],), tmp, dynamo=True, external_data=False, input_names=["image"],
                                  output_names=names, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        except Exception as e:  # the exporter's and onnxruntime's own errors, as one line
            raise ValueError(f"{path}: the export failed ({inpformer._first_line(e)})") from e
        for b in (1, 3):
            t0 = time.perf_counter()
            with torch.no_grad():
                want = scorer(x[:b])
            t1 = time.perf_counter()
            got = [torch.from_numpy(a) for a in session.run(None, {"image": x[:b].numpy()})]
            t2 = time.perf_counter()
            diffs = [float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want)]
            log(f"  batch {b}: max |onnx - torch| / max |torch|: {', '.join(f'{n} {d:.2e}' for n, d in zip(names, diffs))};"
                f" {1e3 * (t2 - t1) / b:.0f} ms/image onnxruntime, {1e3 * (t1 - t0) / b:.0f} ms/image torch")
            if max(diffs) > 1e-4:
                raise ValueError(f"{path}: the ONNX outputs differ from PyTorch's by {max(diffs):.2e} of their maximum")
        size = Path(tmp).stat().st_size
    log(f"wrote {path} ({size / 2**20:.1f} MiB): {opts.image_size} -> {c} px input, outputs {', '.join(names)}"
        + ("" if opts.calibration else " (no calibration, so no normalised_score)"))
    return 0

# -----------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = datasets.Parser(description=__doc__.split("\n\n")[0], epilog="examples:\n" + __doc__.split("\n\n")[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="project checkpoint (.safetensors), official state dict (model.pth or .safetensors), or "
                        "the folder of a run (<out>/model.safetensors or <out>/<class>/model.safetensors)")
    datasets.add_args(p)
    p.add_argument("--out", type=Path, help="output folder (default: <checkpoint folder>/eval, or eval-<data>, "
                                            "-zero-shot, -full-res for those protocols; predictions for --images)")
    p.add_argument("--zero-shot", action="store_true", help="anomaly map = INP distance (paper's zero-shot protocol)")
    p.add_argument("--full-res", action="store_true", help="pixel metrics at each image's original resolution over "
                   "the centre-crop region (the MVTec AD protocol; the border outside the crop is not scored)")
    p.add_argument("--streaming", action="store_true",
                   help="pixel metrics from 65536-bin histograms (constant memory; error bounds in metrics.json)")
    p.add_argument("--map-dtype", choices=["float32", "float16"], default="float32",
                   help="storage of maps for exact metrics (default float32); float16 halves it, rounding the scores")
    p.add_argument("--save-maps", type=datasets.number(low=0), default=0, metavar="N",
                   help="per class, pictures of the N most and N least anomalous test images")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="score these images or folders (no labels): predictions.csv + heatmaps/*.png")
    p.add_argument("--heat-range", nargs=2, type=float, metavar=("LO", "HI"), help="colour heat maps on this range "
                   "(default: the calibration's; uncalibrated --images: min..max over the images scored)")
    p.add_argument("--outline", action="store_true", help="draw the calibrated pixel threshold's outline on pictures")
    p.add_argument("--calibrate", action="store_true", help="store the decision rule learnt on this labelled test set "
                   "(thresholds, normal statistics, heat-map scale) in the checkpoint, its tensors untouched")
    p.add_argument("--export", type=Path, metavar="OUT.onnx",
                   help="write the scoring path as ONNX (anomaly_map, score) and check it with onnxruntime")
    args = p.parse_args(argv)
    if args.images and (args.full_res or args.streaming or args.save_maps or args.calibrate):
        raise ValueError("--images scores unlabelled images: --full-res, --streaming, --save-maps and --calibrate "
                         "need a test set")
    if args.calibrate and args.zero_shot:
        raise ValueError("--calibrate learns the decision rule of the reconstruction maps; drop --zero-shot")
    if args.export and (args.calibrate or args.save_maps or args.streaming or args.full_res or args.zero_shot):
        raise ValueError("--export only writes the ONNX file: run --calibrate, --save-maps, --streaming, --full-res "
                         "or --zero-shot on their own")
    if args.heat_range and not args.heat_range[0] < args.heat_range[1]:
        raise ValueError(f"--heat-range {' '.join(map(str, args.heat_range))}: LO must be below HI")
    return args

def read_calibration(meta, path, log=print):
    """The calibration in a checkpoint's metadata, or None (with a note if it is there but unusable)."""
    cal, need = meta.get("calibration"), {"image_threshold", "pixel_threshold", "score_range", "heat_range", "classes"}
    if cal is None or isinstance(cal, dict) and need <= set(cal):
        return cal
    log(f"note: {path}: unreadable calibration metadata, ignored (evaluate.py --calibrate writes a new one)")

def calibration_target(path) -> Path:
    """The file --calibrate writes: the checkpoint itself, or beside an official .pth its .safetensors twin."""
    path, target = Path(path), Path(path).with_suffix(".safetensors")
    if path != target and target.exists():
        raise ValueError(f"{target}: exists; calibrate that file instead of {path}")
    return target

def write_calibration(path, calibration, protocol=None) -> Path:
    """Store `calibration` in a project checkpoint's metadata: the file is rewritten atomically, every tensor
    as it was. An official state dict (.pth) is left alone and a calibrated project checkpoint is written beside
    it, recording the sizes and data of `protocol` (evaluate()'s). Returns the file written."""
    from safetensors.torch import save_file

    target = calibration_target(path)
    if Path(path) != target:
        p = protocol or {}
        extra = {k: p[k] for k in ("image_size", "crop_size", "data") if k in p}
        inpformer.save_checkpoint(inpformer.load_model(path), target, dict(
            extra, data_root=p.get("root"), classes=list(calibration["classes"]), calibration=calibration))
        return target
    tensors, meta = inpformer.read_state_dict(path)
    with inpformer.atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={**meta, "calibration": _json(calibration)})
    return target

def checkpoint_files(path):
    """[model file]: the file itself, <dir>/model.safetensors, or every <dir>/<class>/model.safetensors."""
    p = Path(path)  # a file that is not there: read_checkpoint_metadata says so
    found = (sorted(p.glob("model.safetensors")) or sorted(p.glob("*/model.safetensors"))) if p.is_dir() else [p]
    if not found:
        raise ValueError(f"{p}: no model.safetensors in it or in its sub-folders")
    return found

def plan_sets(args, meta, ckpt):
    """[(data, root, classes, own)] to evaluate: the command line first, then the checkpoint's metadata. own:
    the checkpoint was trained on that data (by name, or the same folder under another name), None when the
    checkpoint does not say. Another data set defaults to all its classes."""
    split = datasets.split_list
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

def main(argv=None):
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    ckpts = checkpoint_files(args.ckpt)
    base = Path(args.ckpt) if Path(args.ckpt).is_dir() else ckpts[0].parent  # outputs go beside the model(s)
    meta = inpformer.read_checkpoint_metadata(ckpts[0])  # a junk or truncated file fails here, naming itself
    first = inpformer.load_model(ckpts[0])  # and a file that is no INP-Former checkpoint here
    cal = None if args.zero_shot else read_calibration(meta, ckpts[0], log)  # its rule is for reconstruction maps
    opts = Options(image_size=args.image_size or meta.get("image_size") or (cal or {}).get("image_size") or 448,
                   crop_size=args.crop_size or meta.get("crop_size") or (cal or {}).get("crop_size") or 392,
                   batch_size=args.batch_size or 16,
                   device=str(datasets.device(args.device, args.precision)), workers=datasets.workers(args.workers),
                   precision="fp32" if args.precision == "auto" else args.precision, zero_shot=args.zero_shot,
                   full_res=args.full_res, streaming=args.streaming, map_dtype=args.map_dtype, save_maps=args.save_maps,
                   calibration=cal, outline=args.outline, heat_range=args.heat_range)
    if cal and (cal.get("image_size"), cal.get("crop_size")) not in ((None, None), (opts.image_size, opts.crop_size)):
        log(f"note: {ckpts[0]} was calibrated at {cal['image_size']} -> {cal['crop_size']} px, not "
            f"{opts.image_size} -> {opts.crop_size}: its thresholds may not hold")
    if args.outline and not cal:
        log(f"note: --outline draws the calibrated pixel threshold, and {ckpts[0]} has no calibration")
    if (args.images or args.export) and len(ckpts) > 1:
        raise ValueError(f"{args.ckpt}: --images and --export need one model file, not a folder of {len(ckpts)}")
    if args.export:
        return export_onnx(first, args.export, opts, args.images, log)
    if args.images:
        if args.classes and ("," in args.classes or cal and args.classes not in cal["classes"]):
            raise ValueError(f"--classes {args.classes}: with --images, one class whose threshold to use" + (
                f" (calibrated: {', '.join(cal['classes'])})" if cal else ""))
        files, out = image_files(args.images), args.out or base / "predictions"
        log(f"{ckpts[0]}: scoring {len(files)} images at {opts.image_size} -> {opts.crop_size} px on {opts.device}")
        predict_images(first, files, opts, out, args.classes, log)
        log(f"wrote {out / 'predictions.csv'} and {out / 'heatmaps'}/")
        return 0

    sets = plan_sets(args, meta, ckpts[0])
    foreign = [d for d, *_, own in sets if own is False]
    if foreign and not args.zero_shot and not args.calibrate:
        log(f"note: {ckpts[0]} was trained on {meta.get('data')}, not {', '.join(foreign)}; the paper's zero-shot "
            "protocol uses INP-distance maps: add --zero-shot")
    if len(ckpts) > 1 and foreign:
        raise ValueError(f"{args.ckpt}: a single-class run evaluates each model on its own class; pick one "
                         "model file to evaluate on another data set")
    out = args.out or base / ("eval" + "".join(f"-{d}" for d in foreign) + "-zero-shot" * args.zero_shot
                              + "-full-res" * args.full_res)
    jobs = []  # (model file, its metadata, data set, root, classes, output folder, table)
    if len(ckpts) == 1:
        names = [d if [s[0] for s in sets].count(d) == 1 else f"{d}{i + 1}" for i, (d, *_) in enumerate(sets)]
        jobs = [(ckpts[0], meta, d, r, c, out / n if len(sets) > 1 else out, n) for (d, r, c, _), n in zip(sets, names)]
    split = datasets.split_list
    wanted = set(split(args.classes)) - {"all"}
    for ckpt in ckpts if len(ckpts) > 1 else []:  # a single-class run: each model on its own classes (those asked for)
        m = inpformer.read_checkpoint_metadata(ckpt)
        classes = [c for c in split(m.get("classes")) or [ckpt.parent.name] if not wanted or c in wanted]
        if classes:
            jobs.append((ckpt, m, (split(m.get("data")) or [sets[0][0]])[0],
                         (split(args.data_root) or split(m.get("data_root")) or [sets[0][1]])[0], classes,
                         out / ckpt.parent.name, "all"))
    if not jobs:
        raise ValueError(f"{args.ckpt}: no model for --classes {args.classes}")
    if args.calibrate and len(jobs) > len(ckpts):
        raise ValueError("--calibrate learns one rule per model: evaluate it on one data set")
    for ckpt, _, d, root, classes, *_ in jobs if args.calibrate else []:  # fail now, not after the evaluation
        calibration_target(ckpt)
        if not any(s.label == 0 for c in datasets.resolve_classes(d, root, classes)
                   for s in datasets.list_samples(d, root, c, "test")):
            raise ValueError(f"{root}: no normal test image of {d} to calibrate {ckpt} on")
    results = {}
    for ckpt, m, d, root, classes, sub, table in jobs:
        model = first if ckpt == ckpts[0] else inpformer.load_model(ckpt)
        job_opts = opts if ckpt == ckpts[0] or args.zero_shot else dataclasses.replace(
            opts, calibration=read_calibration(m, ckpt, log))
        results.setdefault(table, []).append(evaluate(model, d, root, classes, job_opts, sub, log))
        if args.calibrate:
            log(f"calibrated {write_calibration(ckpt, results[table][-1]['calibration'], results[table][-1]['protocol'])}"
                + (" (its earlier calibration replaced, as --calibrate asked)" if "calibration" in m else ""))
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
