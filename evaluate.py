"""The benchmark: from a checkpoint to the paper's table, seven metrics per class on the labelled test sets.

    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors           # on the data it was trained on
    python evaluate.py --ckpt model.pth --data mvtec --data-root /data/mvtec_anomaly_detection   # authors' weights
    python evaluate.py --ckpt runs/realiad-multi/model.safetensors --data mvtec --data-root /data/mvtec --zero-shot
    python evaluate.py --ckpt runs/mvtec-single                   # a single-class run: each class with its own model
    python evaluate.py --ckpt runs/realiad-multi/model.safetensors --streaming  # bounded memory on Real-IAD

The protocol is the official evaluation_batch(max_ratio=0.01, resize_mask=256) (inpformer.score_maps): each
class scored on its own, "mean" the plain average over classes. The metrics are exact by default (metrics.py);
the paper's P-AUROC, P-AP and AUPRO are ADEval's 200-bin ones, which --metrics adeval reproduces (line/adeval.py),
and --streaming bins them in constant memory. Data arguments default to what the checkpoint records (the authors'
model.pth records none: give --data and --data-root). Written to eval/ beside the checkpoint (suffixed for the
other protocols, or --out): metrics.json/.csv/.md and image_scores.csv. What goes beyond the paper (whole frames,
tiles, pictures, the kNN baseline, bf16 on a CPU) is in line/, imported only where needed.
"""
import copy
import csv
import json
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import inpformer
import metrics
import train  # the command line every script shares

METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")  # the paper's column order
FPR_LIMIT = metrics.FPR_LIMIT


# -----------------------------------------------------------------------------------------------------
# A model ready to score, and images to maps and scores


@dataclass
class Options:
    """How to score images (batching, device and precision, how images are prepared, the kind of map), the
    benchmark's own choices, and how pictures look. The defaults are the command line's but for workers: from
    Python, images load in the calling process unless asked."""
    batch_size: int = 16
    device: str = "auto"
    precision: str = "auto"   # the model runs in this dtype; maps and scores are fp32 whatever it is
    workers: int = 0
    geometry: data.ResizeCrop = None  # None: the model's own (data.geometry_of its config's)
    zero_shot: bool = False   # maps are the INP distance (the paper's zero-shot protocol)
    full_res: bool = False    # pixel metrics at each image's own resolution (the MVTec AD protocol)
    streaming: bool = False   # pixel metrics from histograms, in constant memory
    map_dtype: str = "float32"
    metrics: str = "exact"    # or "adeval": P-AUROC, P-AP and AUPRO binned as the official code's ADEval 1.1.0
    bank_size: int = None     # the kNN baseline's memory bank, tokens a class at most (None: line.knn.BANK_SIZE)
    baseline: str = None      # "knn": also score the kNN baseline (line/knn.py) on every class
    save_maps: int = 0        # pictures of the N most and N least anomalous images of each class
    pictures: object = None   # line.pictures.PictureStyle: how pictures look (None: its defaults)

    def check(self):
        """Refuse the values and combinations the benchmark cannot score, naming the flags."""
        if self.map_dtype not in ("float32", "float16") or (self.streaming and self.map_dtype != "float32"):
            raise ValueError(f"--map-dtype {self.map_dtype}: use float32 or float16 (float32 with --streaming, which "
                             "keeps no maps)")
        if self.metrics not in ("exact", "adeval"):
            raise ValueError(f"--metrics {self.metrics}: use exact or adeval")
        if self.metrics == "adeval" and (self.streaming or self.full_res or self.map_dtype != "float32"):
            raise ValueError("--metrics adeval bins each class's float32 256x256 maps as the official code does: drop "
                             "--streaming, --full-res and --map-dtype float16")


def load_ready(ckpt, device, precision):
    """A checkpoint loaded straight onto `device` in `precision` (see ready_model: scoring it needs no copy)."""
    dtype = train.PRECISIONS[train.resolve_precision(precision, device)]
    model = inpformer.load_model(ckpt, device).to(dtype)
    if half_on_cpu(model):
        from line.cpu import use_cpu_attention

        use_cpu_attention(model.encoder)
    return model


def half_on_cpu(module) -> bool:
    """A model (or its encoder) in bf16 on a CPU, where scoring takes line/cpu.py's speed paths: attention as plain
    products (the CPU's bf16 units), a few images a pass."""
    p = next(module.parameters())
    return p.device.type == "cpu" and p.dtype != torch.float32


def asked_geometry(model, args, ckpt, log=print, base=None) -> data.ResizeCrop:
    """The model's own geometry (or `base`, e.g. a calibration's), with the sizes the command line gives
    (train.geometry); a note says when it differs from the model's."""
    own = data.geometry_of(model.config.geometry)
    geometry = train.geometry(args, base or own)
    if geometry != own:
        log(f"note: {ckpt} was trained at {own.describe()}; scoring at {geometry.describe()} as asked")
    return geometry.check(model.encoder.config.patch_size)


def ready_model(model, device="auto", precision="auto"):
    """The model in eval mode on `device`, in `precision`: the model itself when it already is, else a copy,
    so that scoring never changes the model the caller handed in."""
    device = train.resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = train.PRECISIONS[train.resolve_precision(precision, device)]
    p = model.prototype_token
    if p.device == device and p.dtype == dtype and not model.training:
        if not half_on_cpu(model):
            return model
        from line.cpu import uses_cpu_attention  # its attention is set on a copy: never on the caller's model

        if uses_cpu_attention(model.encoder):
            return model
    model = copy.deepcopy(model).to(device, dtype).eval()
    if half_on_cpu(model):
        from line.cpu import use_cpu_attention

        use_cpu_attention(model.encoder)
    return model


def predict_maps(model, x, zero_shot=False, geometry=None, tile_batch=Options.batch_size, predictor=None):
    """Preprocessed images -> (B, 256, 256) smoothed float32 maps and (B,) image scores, on the protocol of
    `geometry` (default: the model's; whole frames and tiles: line.frames.predict_frames): reconstruction error,
    or with zero_shot the INP distance; or predictor(x, geometry) -> (maps, scores) instead (the kNN baseline).
    x: a (B, 3, h, w) batch, or a list of frames (tiles); cast to the model's dtype and device."""
    p = model.prototype_token
    x = [f.to(p.device, p.dtype) for f in x] if isinstance(x, list) else x.to(p.device, p.dtype)
    geometry = geometry or data.geometry_of(model.config.geometry)
    with torch.inference_mode():
        if predictor is not None:
            maps, scores = predictor(x, geometry)
        elif type(geometry) is data.ResizeCrop and not half_on_cpu(model):  # the paper's crop
            maps, scores = model.predict_zero_shot(x) if zero_shot else model.predict(x)
        else:  # whole frames and tiles, and bf16 on a CPU (line/cpu.py)
            from line.frames import predict_frames

            maps, scores = predict_frames(model, x, geometry, zero_shot, tile_batch)
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
                     f"ETA {train.format_time((self.total - self.done) / rate)}")

    def rate(self):
        return self.done / max(time.monotonic() - self.start, 1e-9)

# -----------------------------------------------------------------------------------------------------
# Accumulating and scoring one class


class ClassScores:
    """Image labels and scores and pixel masks and maps of one class, added batch by batch; then the seven
    metrics. Exact (default): maps and masks go into preallocated (N, H, W) buffers (maps float32, or float16
    on request) that metrics.compute_all ranks exactly. Streaming: they only update a metrics.PixelHistogram,
    whose memory does not grow. Image scores are always exact. pixels=False (no masks): image metrics only."""

    def __init__(self, n, streaming=False, map_dtype=torch.float32, pixels=True, adeval=False):
        self.n, self.count, self.pixels, self.map_dtype, self.adeval = n, 0, pixels, map_dtype, adeval
        self.labels, self.scores = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float32)
        self.hist = metrics.PixelHistogram() if streaming and pixels else None
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
            pairs = zip(masks, maps) if isinstance(maps, list) else [(masks, maps)]
            for mask, amap in pairs:
                self.hist.update(mask, amap)
            return
        shapes = {tuple(m.shape) for m in maps}
        if self.maps is None and len(shapes) == 1:
            self.maps = torch.empty((self.n, *next(iter(shapes))), dtype=self.map_dtype)
            self.masks = torch.empty(self.maps.shape, dtype=torch.bool)
        if self.maps is None or shapes - {tuple(self.maps.shape[1:])}:
            raise ValueError(f"test images of one class have different sizes ({', '.join(map(str, sorted(shapes)))}); "
                             "exact --full-res needs one size per class, use --streaming")
        self.maps[i:i + b] = torch.stack(list(maps))
        self.masks[i:i + b] = torch.stack(list(masks))

    def compute(self, warn=lambda message: None):
        """{metric: float} in METRICS order, then the F1-max thresholds "I-threshold" and "P-threshold";
        undefined values are NaN (warn(message) says why), absent ones None."""
        if self.count != self.n:
            raise ValueError(f"{self.count} of {self.n} images were added")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", metrics.UndefinedMetricWarning)
            if self.pixels and self.hist is None:
                result = metrics.compute_all(self.labels, self.scores, self.masks, self.maps, FPR_LIMIT, True)
                if self.adeval:  # the official code's binned P-AUROC, P-AP and AUPRO; the other four are exact there
                    from line.adeval import adeval_pixel_metrics

                    result.update(adeval_pixel_metrics(self.masks, self.maps, fpr_limit=FPR_LIMIT))
            else:
                f1, t = metrics.f1_threshold(self.labels, self.scores)
                result = {"I-AUROC": metrics.auroc(self.labels, self.scores),
                          "I-AP": metrics.average_precision(self.labels, self.scores), "I-F1max": f1, "I-threshold": t}
                if self.hist is not None:
                    result.update(self.hist.compute(FPR_LIMIT, thresholds=True))
        for w in caught:  # one log line each instead of python's two-line warning format
            warn(str(w.message))
        return {k: float(result[k]) if k in result else None for k in (*METRICS, "I-threshold", "P-threshold")}

# -----------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class ImageScore:
    """One row of image_scores.csv."""
    cls: str
    path: str
    label: int
    score: float


def evaluate(model, data_set, root, classes, opts=Options(), out_dir=None, log=print):
    """The seven metrics of `model` on the test sets of `classes` ("all", "a,b" or a list) of the data set named
    `data_set` (as --data names it).

    The model is scored as it is when it already sits on opts.device in opts.precision, else as a copy: the
    caller's model never changes. Returns {"classes": {class: {metric: value}}, "mean": {metric: value},
    "counts": ..., "protocol": ..., "thresholds": {class: {"image": t, "pixel": t}} (the F1-max ones)}
    (fractions; NaN where undefined, None where absent: pixel metrics of a class without masks; streaming adds
    "error_bounds"). Writes nothing unless out_dir is given: then metrics.json/.csv/.md, image_scores.csv, and
    with opts.save_maps=N pictures under maps/<class>/."""
    opts.check()
    model = ready_model(model, opts.device, opts.precision)
    geometry = (opts.geometry or data.geometry_of(model.config.geometry)).check(model.encoder.config.patch_size)
    classes = data.resolve_classes(data_set, root, classes)
    # Build every test set first: their pre-flight file checks fail now, not an hour into the run.
    test_sets = {c: data.test_set(data_set, root, c, geometry, native=opts.full_res) for c in classes}
    train_sets = {}
    if opts.baseline == "knn":  # the baseline's banks, from each class's training images: checked now too
        from line import knn as nearest

        train_sets = {c: data.train_set(data_set, root, c, geometry) for c in classes}
        opts = replace(opts, bank_size=opts.bank_size or nearest.BANK_SIZE)
    total = sum(len(ds) for ds in test_sets.values())
    precision = train.resolve_precision(opts.precision, model.prototype_token.device)
    maps_kind = "INP distance (zero-shot)" if opts.zero_shot else "reconstruction error"
    pixels_at = "original resolution" if opts.full_res else f"{inpformer.MAP_SIZE}x{inpformer.MAP_SIZE}"
    log(f"{data_set}: {len(classes)} classes, {total} test images, {geometry.describe()}, {maps_kind} maps, pixels at "
        f"{pixels_at}, {'streaming' if opts.streaming else 'exact'} metrics, {model.prototype_token.device} "
        f"{precision}")
    progress = Progress(total, log)
    per_class, counts, thresholds = {}, {}, {}  # by class: the seven metrics, image counts, F1-max thresholds
    bounds, knn_per_class = {}, {}              # by class: streaming error bounds, the kNN baseline's metrics
    rows = []                                   # every image's score
    for cls, ds in test_sets.items():
        t0 = time.monotonic()
        acc, class_rows = score_class(model, ds, opts, progress)
        if not acc.pixels:
            log(f"  note: {cls}: no ground_truth/ masks, so image metrics only")
        rows += class_rows
        m = acc.compute(warn=lambda msg, cls=cls: log(f"  note: {cls}: {msg}"))
        per_class[cls] = {k: m[k] for k in METRICS}
        thresholds[cls] = {"image": m["I-threshold"], "pixel": m["P-threshold"]}
        n_bad = int(acc.labels.sum())
        counts[cls] = {"normal": len(ds) - n_bad, "anomalous": n_bad}
        line = f"  {cls}: {len(ds)} images ({n_bad} anomalous) in {time.monotonic() - t0:.1f}s; "
        line += " ".join(f"{k} {cell(m[k])}" for k in METRICS)
        if acc.hist:
            bounds[cls] = acc.hist.error_bounds(fpr_limit=FPR_LIMIT)
            line += f"; binning error <= {100 * max(bounds[cls].values()):.3f} points"
        log(line)
        if out_dir and opts.save_maps:
            from line.pictures import save_maps

            save_maps(model, ds, acc.scores.tolist(), opts, Path(out_dir) / "maps" / cls, cls)
        if opts.baseline == "knn":
            knn_per_class[cls] = nearest.evaluate_class(model, train_sets[cls], ds, opts, log)
    log(f"{data_set}: {total} images, {progress.rate():.1f} img/s")
    protocol = dict(data=data_set, root=str(root), **protocol_of(opts, geometry, precision))
    part = dict(classes=per_class, counts=counts, protocol=protocol, error_bounds=bounds, thresholds=thresholds)
    if knn_per_class:
        part["baselines"] = {"knn": dict(classes=knn_per_class, bank_size=opts.bank_size)}
    results = combine([part])
    if out_dir:
        write_results(results, out_dir, rows)
    return results


def protocol_of(opts, geometry, precision) -> dict:
    """How the images were scored, as metrics.json's "protocol" records it (after the data set and root)."""
    if opts.streaming:
        metric_kind = f"streaming ({metrics.PixelHistogram().bins} bins over [0, 2])"
    elif opts.metrics == "adeval":
        metric_kind = ("adeval 1.1.0 (P-AUROC, P-AP, AUPRO from 200 bins per class between its min and max map "
                       "value, trapezoid AP; I-AUROC, I-AP, I-F1max, P-F1max exact)")
    else:
        metric_kind = f"exact ({opts.map_dtype} maps)"
    return dict(geometry=geometry.to_dict(), maps="inp-distance" if opts.zero_shot else "reconstruction",
                pixels="original" if opts.full_res else inpformer.MAP_SIZE, gaussian_sigma=inpformer.GAUSSIAN_SIGMA,
                gaussian_padding="zeros" if geometry.crop_size else "reflect",  # see line.frames
                max_ratio=inpformer.MAX_RATIO, fpr_limit=FPR_LIMIT, precision=precision, metrics=metric_kind)


def score_class(model, ds, opts, progress=None, predictor=None):
    """Every image of one class's test set scored: (ClassScores, [ImageScore]). predictor: another way to map
    images (see predict_maps), else the model's own."""
    pixels = not any(s.label and s.mask is None for s in ds.samples)
    acc = ClassScores(len(ds), opts.streaming, getattr(torch, opts.map_dtype), pixels, opts.metrics == "adeval")
    rows = []
    batches = scored_batches(model, ds, opts.batch_size, opts.workers, opts.zero_shot, predictor)
    for batch, maps, scores in batches:
        if opts.full_res:  # each native mask, and the map resized to its box
            masks = batch["native_mask"]
            maps = [F.interpolate(m[None, None], size=t.shape, mode="bilinear", align_corners=False)[0, 0]
                    for m, t in zip(maps, masks)]
        else:
            masks = masks_at_map_size(batch["mask"])
        acc.add(batch["label"], scores, masks, maps)
        rows += [ImageScore(ds.samples[0].cls, p, int(y), float(s))
                 for p, y, s in zip(batch["path"], batch["label"], scores)]
        if progress is not None:
            progress.step(len(scores), ds.samples[0].cls)
    return acc, rows


def class_mean(per_class):
    """The mean of each metric over classes; None (absent) where any class lacks it."""
    mean = {}
    for k in METRICS:
        values = [m[k] for m in per_class.values()]
        mean[k] = None if None in values else float(np.mean(values))
    return mean


def combine(parts, **protocol):
    """One results dict (classes, mean, counts, baselines) from the results of disjoint sets of classes, e.g. the
    models of a single-class run."""
    def merged(key):
        out = {}
        for part in parts:
            out.update(part.get(key, {}))
        return out

    per_class, bounds = merged("classes"), merged("error_bounds")
    mean = class_mean(per_class)
    roots = list(dict.fromkeys(part["protocol"]["root"] for part in parts))  # the parts share all but their roots
    protocol = dict(parts[-1]["protocol"], root=",".join(roots), **protocol)
    results = dict(classes=per_class, mean=mean, counts=merged("counts"), thresholds=merged("thresholds"),
                   protocol=protocol)
    if bounds:
        results["error_bounds"] = bounds
    baselines = {}
    for part in parts:
        for name, b in part.get("baselines", {}).items():
            baselines.setdefault(name, dict(b, classes={}))["classes"].update(b["classes"])
    for b in baselines.values():
        b["mean"] = class_mean(b["classes"])
    if baselines:
        results["baselines"] = baselines
    return results

# -----------------------------------------------------------------------------------------------------
# Output


def cell(v):
    if v is None:
        return "—"
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}"


def markdown_table(results) -> str:
    """Each class, then "mean"; the paper's columns; percent with one decimal ("n/a" where undefined, "—"
    where absent)."""
    lines = ["| class | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, m in [*results["classes"].items(), ("mean", results["mean"])]:
        lines.append(f"| {name} | " + " | ".join(cell(m[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def to_json(x, **kw):
    """JSON with undefined metrics (NaN, which JSON lacks) written as null."""
    return json.dumps(without_nan(x), **kw)


def without_nan(x):
    """x with every float NaN or infinity, in any nested dict or list, replaced by None."""
    if isinstance(x, dict):
        return {k: without_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [without_nan(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(results, out_dir, image_scores=None):
    """metrics.json, metrics.csv (class, then the seven metrics as fractions), metrics.md, image_scores.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(to_json(results, indent=1) + "\n")
    rows = [[name, *("" if m[k] is None else repr(m[k]) for k in METRICS)]
            for name, m in [*results["classes"].items(), ("mean", results["mean"])]]
    write_csv(out / "metrics.csv", ["class", *METRICS], rows)
    (out / "metrics.md").write_text(markdown_table(results) + "\n")
    if image_scores is not None:
        write_csv(out / "image_scores.csv", ["class", "path", "label", "score"],
                  [(r.cls, r.path, r.label, repr(r.score)) for r in image_scores])

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

# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = train.script_parser(__doc__)
    p.add_argument("--ckpt", required=True,
                   help="project checkpoint (.safetensors), official state dict (model.pth or .safetensors), or "
                        "the folder of a run (<out>/model.safetensors or <out>/<class>/model.safetensors)")
    train.add_data_args(p, data.DATASETS, defaults={"batch-size": str(Options.batch_size)})
    p.add_argument("--out", type=Path, help="output folder (default: <checkpoint folder>/eval, or eval-<data>, "
                                            "-zero-shot, -full-res for those protocols)")
    p.add_argument("--zero-shot", action="store_true", help="anomaly map = INP distance (paper's zero-shot protocol)")
    p.add_argument("--full-res", action="store_true", help="pixel metrics at each image's original resolution over "
                   "the centre-crop region (the MVTec AD protocol; the border outside the crop is not scored)")
    p.add_argument("--metrics", choices=["exact", "adeval"], default="exact",
                   help="exact (default): every threshold, scikit-learn's step-wise AP; adeval: P-AUROC, P-AP and "
                        "AUPRO from 200-bin histograms per class, as the official code reports them (ADEval 1.1.0)")
    p.add_argument("--baseline", choices=["knn"], help="also score a PatchCore-style nearest-neighbour baseline on "
                   "the same encoder (line/knn.py): its rows print under the table, metrics.json has them in "
                   "baselines.knn")
    p.add_argument("--bank-size", type=train.number(), metavar="N",
                   help="the baseline's memory bank: at most N tokens per class, a seeded random subset (default "
                        "line.knn.BANK_SIZE)")
    p.add_argument("--streaming", action="store_true",
                   help="pixel metrics from 65536-bin histograms (constant memory; error bounds in metrics.json)")
    p.add_argument("--map-dtype", choices=["float32", "float16"], default="float32",
                   help="storage of maps for exact metrics (default float32); float16 halves it, rounding the scores")
    p.add_argument("--save-maps", type=train.number(low=0), default=0, metavar="N",
                   help="per class, pictures of the N most and N least anomalous test images")
    train.add_picture_args(p)
    args = p.parse_args(argv)
    train.check_picture_args(args)
    return args


@dataclass
class Job:
    """One model scored on one data set."""
    ckpt: Path
    meta: dict  # what the checkpoint records
    data_set: DataSet
    out: Path    # where its metrics go
    table: str   # the printed table its rows join


def plan_jobs(args, ckpts, first, sets, out) -> list[Job]:
    """Every (model, data set) to evaluate. One model file (whose metadata is `first`): on each of `sets`. The
    folder of a single-class run: each model on its own classes (those of --classes)."""
    if len(ckpts) == 1:
        names = [s.data for s in sets]
        jobs = []
        for i, s in enumerate(sets):
            table = s.data if names.count(s.data) == 1 else f"{s.data}{i + 1}"
            jobs.append(Job(ckpts[0], first, s, out / table if len(sets) > 1 else out, table))
        return jobs
    if any(s.own is False for s in sets):
        raise ValueError(f"{args.ckpt}: a single-class run evaluates each model on its own class; pick one model "
                         "file to evaluate on another data set")
    wanted = set(data.split_list(args.classes)) - {"all"}
    jobs = []
    for ckpt in ckpts:
        meta = inpformer.read_checkpoint_metadata(ckpt)
        trained = data.split_list(meta.get("classes")) or [ckpt.parent.name]
        classes = [c for c in trained if not wanted or c in wanted]
        if not classes:
            continue
        name = (data.split_list(meta.get("data")) or [sets[0].data])[0]
        roots = data.split_list(args.data_root) or data.split_list(meta.get("data_root")) or [sets[0].root]
        root = roots[0]
        jobs.append(Job(ckpt, meta, DataSet(name, root, classes, own=True), out / ckpt.parent.name, "all"))
    if not jobs:
        raise ValueError(f"{args.ckpt}: no model for --classes {args.classes}")
    return jobs


def main(argv=None, log=train.log_line):
    args = parse_args(argv)
    device, precision = train.device_and_precision(args)
    ckpts = checkpoint_files(args.ckpt)
    base = Path(args.ckpt) if Path(args.ckpt).is_dir() else ckpts[0].parent  # outputs go beside the model(s)
    first_model = load_ready(ckpts[0], device, precision)  # a file that is no checkpoint fails here
    first = inpformer.read_checkpoint_metadata(ckpts[0])
    sets = plan_data_sets(first, ckpts[0], args.data, args.data_root, args.classes)
    foreign = [s.data for s in sets if s.own is False]
    if foreign and not args.zero_shot:
        log(f"note: {ckpts[0]} was trained on {first.get('data')}, not {', '.join(foreign)}; the paper's zero-shot "
            "protocol uses INP-distance maps: add --zero-shot")
    protocols = [f"-{d}" for d in foreign]
    if args.zero_shot:
        protocols.append("-zero-shot")
    if args.full_res:
        protocols.append("-full-res")
    if args.metrics == "adeval":
        protocols.append("-adeval")
    out = args.out or base / ("eval" + "".join(protocols))
    jobs = plan_jobs(args, ckpts, first, sets, out)
    opts = Options(batch_size=args.batch_size or Options.batch_size, device=str(device), precision=precision,
                   workers=train.workers(args.workers), zero_shot=args.zero_shot, full_res=args.full_res,
                   streaming=args.streaming, map_dtype=args.map_dtype, metrics=args.metrics, save_maps=args.save_maps,
                   baseline=args.baseline, bank_size=args.bank_size)
    results, written = {}, []
    for job in jobs:
        model = first_model if job.ckpt == ckpts[0] else load_ready(job.ckpt, device, precision)
        geometry = asked_geometry(model, args, job.ckpt, log)
        pictures = None
        if args.save_maps:  # titled with the calibration's decisions, when the checkpoint has one
            import line.decisions
            import line.pictures

            calibration = None if args.zero_shot else line.decisions.read_calibration(job.meta, job.ckpt, log)
            pictures = line.pictures.picture_style(args, calibration, job.ckpt, log)
        job_opts = replace(opts, geometry=geometry, pictures=pictures)
        s = job.data_set
        results.setdefault(job.table, []).append(evaluate(model, s.data, s.root, s.classes, job_opts, job.out, log))
        written.append(job.out)
        del model
    for table, parts in results.items():
        merged = combine(parts, **({"models": [str(j.ckpt) for j in jobs]} if len(ckpts) > 1 else {}))
        if len(parts) > 1:  # a single-class run: each model's metrics in its folder, the table over all of them
            write_results(merged, out)
            written.append(out)
        if len(results) > 1:
            log(f"\n{table}:")
        log(markdown_table(merged))
        for name, b in merged.get("baselines", {}).items():
            log(f"\n{name} baseline (PatchCore-style nearest neighbour on the same encoder, {b['bank_size']} tokens "
                "a class at most):")
            log(markdown_table(b))
    files = "metrics.json, metrics.csv, metrics.md" + (", image_scores.csv" if len(ckpts) == 1 else "")
    log(f"wrote {files}{', maps/' if args.save_maps else ''} in {', '.join(map(str, dict.fromkeys(written)))}")
    return 0


if __name__ == "__main__":
    train.guard(main)
