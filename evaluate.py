"""The benchmark: the paper's seven metrics per class on labelled test sets, printed as a table and written
as metrics.json/.csv/.md with every image's score, and pictures of the most and least anomalous images.

    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors           # on the data it was trained on
    python evaluate.py --ckpt model.pth --data mvtec --data-root /data/mvtec_anomaly_detection   # authors' weights
    python evaluate.py --ckpt runs/realiad-multi/model.safetensors --data mvtec --data-root /data/mvtec --zero-shot
    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors --save-maps 5  # + 5 most/least anomalous per class
    python evaluate.py --ckpt runs/mvtec-single                   # a single-class run: each class with its own model
    python evaluate.py --ckpt runs/realiad-multi/model.safetensors --streaming  # bounded memory on Real-IAD
    python evaluate.py --ckpt runs/mvtec-multi/model.safetensors --full-res     # pixel metrics at native resolution
    python evaluate.py --ckpt model.pth --data mvtec --data-root /data/mvtec --metrics adeval   # the paper's numbers

Data arguments default to what the checkpoint records (data set, root, classes; sizes from its config); the
authors' `model.pth` records none: give --data and --data-root. Written under --out (default `eval/` beside the
checkpoint; `eval-<data>`, `-zero-shot`, `-full-res` for the other protocols): metrics.json (with each class's
F1-max thresholds), metrics.csv (fractions), metrics.md (percent), image_scores.csv; --save-maps N:
maps/<class>/{most,least}_NN_*.png. Scoring new images, calibrating a decision rule and ONNX export are
predict.py's.

Protocol (the official `evaluation_batch(max_ratio=0.01, resize_mask=256)`, constants in inpformer.py): maps at
the crop size, resized bilinearly to 256x256, 5x5 Gaussian with sigma 4 and zero padding; image score = mean of
the top 1% (655) of the smoothed pixels; ground truth = the crop-size mask resized to 256 with `nearest`, then
> 0.5. Whole-frame and tiled checkpoints (line.geometry) score the whole frame the same way, with an
antialiased resize and a reflect-padded Gaussian, so that the border counts like the inside. Each class is
scored on its own; "mean" is the plain average over classes. Metrics come from metrics.py and are exact,
not the 200-bin approximations of the authors' GPU code (expect pixel AP a little off the paper's numbers).
--full-res (the MVTec AD protocol) scores pixels at each image's own resolution over the part the centre crop
saw. --zero-shot (paper Table S8): the map is the INP distance. Memory: one class at a time;
exact metrics peak at about 2.4x the float32 maps; --map-dtype float16 halves that and moves the metrics
(~0.015 points); --streaming keeps 65536-bin histograms (~0.1 GB) and writes its largest possible error
("error_bounds"). --precision bf16 runs the model in bf16, also on CPUs with bf16 units; maps, scores and
metrics stay fp32. --metrics adeval reports what the official code reports, to compare with the paper's
tables: P-AUROC, P-AP and AUPRO from ADEval 1.1.0's 200 bins per class (line/adeval.py), the
other four as here; written to `eval-adeval/`, recorded in metrics.json's "protocol".
"""
import json
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cli
import data as datasets  # the module; `data` is the name of a data set in the functions below
import inpformer
import metrics
import scoring

METRICS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")  # the paper's column order
FPR_LIMIT = metrics.FPR_LIMIT


@dataclass
class Options(scoring.Options):
    """How to evaluate: scoring.Options (batching, device, precision, geometry, zero-shot, pictures), and the
    benchmark's own. The defaults are the command line's."""
    full_res: bool = False    # pixel metrics at each image's own resolution (the MVTec AD protocol)
    streaming: bool = False   # pixel metrics from histograms, in constant memory
    map_dtype: str = "float32"
    metrics: str = "exact"    # or "adeval": P-AUROC, P-AP and AUPRO binned as the official code's ADEval 1.1.0
    bank_size: int = None     # the kNN baseline's memory bank, tokens a class at most (None: line.knn.BANK_SIZE)
    baseline: str = None      # "knn": also score the kNN baseline (line/knn.py) on every class
    save_maps: int = 0        # pictures of the N most and N least anomalous images of each class

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


def evaluate(model, data, root, classes, opts=Options(), out_dir=None, log=print):
    """The seven metrics of `model` on the test sets of `classes` ("all", "a,b" or a list) of one data set.

    The model is scored as it is when it already sits on opts.device in opts.precision, else as a copy: the
    caller's model never changes. Returns {"classes": {class: {metric: value}}, "mean": {metric: value},
    "counts": ..., "protocol": ..., "thresholds": {class: {"image": t, "pixel": t}} (the F1-max ones)}
    (fractions; NaN where undefined, None where absent: pixel metrics of a class without masks; streaming adds
    "error_bounds"). Writes nothing unless out_dir is given: then metrics.json/.csv/.md, image_scores.csv, and
    with opts.save_maps=N pictures under maps/<class>/."""
    if opts.map_dtype not in ("float32", "float16") or (opts.streaming and opts.map_dtype != "float32"):
        raise ValueError(f"--map-dtype {opts.map_dtype}: use float32 or float16 (float32 with --streaming, which "
                         "keeps no maps)")
    if opts.metrics not in ("exact", "adeval"):
        raise ValueError(f"--metrics {opts.metrics}: use exact or adeval")
    if opts.metrics == "adeval" and (opts.streaming or opts.full_res or opts.map_dtype != "float32"):
        raise ValueError("--metrics adeval bins each class's float32 256x256 maps as the official code does: drop "
                         "--streaming, --full-res and --map-dtype float16")
    model = scoring.ready_model(model, opts.device, opts.precision)
    geometry = (opts.geometry or datasets.geometry_of(model.config.geometry)).check(model.encoder.config.patch_size)
    classes = datasets.resolve_classes(data, root, classes)
    # Build every test set first: their pre-flight file checks fail now, not an hour into the run.
    test_sets = {c: datasets.test_set(data, root, c, geometry, native=opts.full_res) for c in classes}
    train_sets = {}
    if opts.baseline == "knn":  # the baseline's banks, from each class's training images: checked now too
        from line import knn as nearest

        train_sets = {c: datasets.train_set(data, root, c, geometry) for c in classes}
        opts = replace(opts, bank_size=opts.bank_size or nearest.BANK_SIZE)
    total = sum(len(ds) for ds in test_sets.values())
    precision = cli.resolve_precision(opts.precision, model.prototype_token.device)
    maps_kind = "INP distance (zero-shot)" if opts.zero_shot else "reconstruction error"
    pixels_at = "original resolution" if opts.full_res else f"{inpformer.MAP_SIZE}x{inpformer.MAP_SIZE}"
    log(f"{data}: {len(classes)} classes, {total} test images, {geometry.describe()}, {maps_kind} maps, pixels at "
        f"{pixels_at}, {'streaming' if opts.streaming else 'exact'} metrics, {model.prototype_token.device} "
        f"{precision}")
    progress = scoring.Progress(total, log)
    per_class, counts, bounds, thresholds, rows, knn_per_class = {}, {}, {}, {}, [], {}
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
        line += " ".join(f"{k} {_cell(m[k])}" for k in METRICS)
        if acc.hist:
            bounds[cls] = acc.hist.error_bounds(fpr_limit=FPR_LIMIT)
            line += f"; binning error <= {100 * max(bounds[cls].values()):.3f} points"
        log(line)
        if out_dir and opts.save_maps:
            save_maps(model, ds, acc.scores.tolist(), opts, Path(out_dir) / "maps" / cls, cls)
        if opts.baseline == "knn":
            knn_per_class[cls] = knn_baseline(model, train_sets[cls], ds, opts, log)
    log(f"{data}: {total} images, {progress.rate():.1f} img/s")
    if opts.streaming:
        metric_kind = f"streaming ({metrics.PixelHistogram().bins} bins over [0, 2])"
    elif opts.metrics == "adeval":
        metric_kind = ("adeval 1.1.0 (P-AUROC, P-AP, AUPRO from 200 bins per class between its min and max map "
                       "value, trapezoid AP; I-AUROC, I-AP, I-F1max, P-F1max exact)")
    else:
        metric_kind = f"exact ({opts.map_dtype} maps)"
    protocol = dict(data=data, root=str(root), geometry=geometry.to_dict(),
                    maps="inp-distance" if opts.zero_shot else "reconstruction",
                    pixels="original" if opts.full_res else inpformer.MAP_SIZE, gaussian_sigma=inpformer.GAUSSIAN_SIGMA,
                    gaussian_padding="zeros" if geometry.crop_size else "reflect",  # see line.frames
                    max_ratio=inpformer.MAX_RATIO, fpr_limit=FPR_LIMIT, precision=precision, metrics=metric_kind)
    part = dict(classes=per_class, counts=counts, protocol=protocol, error_bounds=bounds, thresholds=thresholds)
    if knn_per_class:
        part["baselines"] = {"knn": dict(classes=knn_per_class, bank_size=opts.bank_size)}
    results = combine([part])
    if out_dir:
        write_results(results, out_dir, rows)
    return results


def score_class(model, ds, opts, progress=None, predictor=None):
    """Every image of one class's test set scored: (ClassScores, [ImageScore]). predictor: another way to map
    images (see scoring.predict_maps), else the model's own."""
    pixels = not any(s.label and s.mask is None for s in ds.samples)
    acc = ClassScores(len(ds), opts.streaming, getattr(torch, opts.map_dtype), pixels, opts.metrics == "adeval")
    rows = []
    batches = scoring.scored_batches(model, ds, opts.batch_size, opts.workers, opts.zero_shot, predictor)
    for batch, maps, scores in batches:
        if opts.full_res:  # each native mask, and the map resized to its box
            masks = batch["native_mask"]
            maps = [F.interpolate(m[None, None], size=t.shape, mode="bilinear", align_corners=False)[0, 0]
                    for m, t in zip(maps, masks)]
        else:
            masks = scoring.masks_at_map_size(batch["mask"])
        acc.add(batch["label"], scores, masks, maps)
        rows += [ImageScore(ds.samples[0].cls, p, int(y), float(s))
                 for p, y, s in zip(batch["path"], batch["label"], scores)]
        if progress is not None:
            progress.step(len(scores), ds.samples[0].cls)
    return acc, rows


def knn_baseline(model, train, ds, opts, log):
    """The seven metrics of the kNN baseline (line/knn.py) on one class's test set `ds`: its bank from the class's
    training set `train`, prepared as the model's images."""
    t0 = time.monotonic()
    cls = ds.samples[0].cls
    from line import knn as nearest

    knn = nearest.KNNBaseline(model, opts.bank_size, batch_size=opts.batch_size).fit(train, opts.workers)
    acc, _ = score_class(model, ds, opts, predictor=knn.predict)
    m = acc.compute(warn=lambda msg: log(f"  note: {cls} (knn baseline): {msg}"))
    log(f"  {cls} (knn baseline, {len(knn.bank)} tokens in its bank) in {time.monotonic() - t0:.1f}s; "
        + " ".join(f"{k} {_cell(m[k])}" for k in METRICS))
    return {k: m[k] for k in METRICS}


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
    maps = [scoring.predict_maps(model, item["image"][None], opts.zero_shot, ds.geometry, opts.batch_size)[0][0]
            .cpu().numpy() for item in items]
    style = opts.pictures
    scale = style.scale() or (min(m.min() for m in maps), max(m.max() for m in maps), "min..max here")
    folder.mkdir(parents=True, exist_ok=True)
    for (name, i), item, amap in zip(picks, items, maps):
        mask = scoring.masks_at_map_size(item["mask"][None])[0]
        title = style.title(item["path"], float(scores[i]), cls)
        image = scoring.picture(scoring.to_rgb(item["image"]), amap, scale, title, mask.numpy(),
                                style.outline_threshold())
        image.save(folder / f"{name}_{scoring.file_stem(item['path'])}.png", compress_level=scoring.PNG_LEVEL)


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


def _cell(v):
    if v is None:
        return "—"
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}"


def markdown_table(results) -> str:
    """Each class, then "mean"; the paper's columns; percent with one decimal ("n/a" where undefined, "—"
    where absent)."""
    lines = ["| class | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, m in [*results["classes"].items(), ("mean", results["mean"])]:
        lines.append(f"| {name} | " + " | ".join(_cell(m[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def to_json(x, **kw):
    """JSON with undefined metrics (NaN, which JSON lacks) written as null."""
    return json.dumps(json.loads(json.dumps(x), parse_constant=lambda _: None), **kw)


def write_results(results, out_dir, image_scores=None):
    """metrics.json, metrics.csv (class, then the seven metrics as fractions), metrics.md, image_scores.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(to_json(results, indent=1) + "\n")
    rows = [[name, *("" if m[k] is None else repr(m[k]) for k in METRICS)]
            for name, m in [*results["classes"].items(), ("mean", results["mean"])]]
    scoring.write_csv(out / "metrics.csv", ["class", *METRICS], rows)
    (out / "metrics.md").write_text(markdown_table(results) + "\n")
    if image_scores is not None:
        scoring.write_csv(out / "image_scores.csv", ["class", "path", "label", "score"],
                  [(r.cls, r.path, r.label, repr(r.score)) for r in image_scores])

# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = cli.script_parser(__doc__)
    p.add_argument("--ckpt", required=True,
                   help="project checkpoint (.safetensors), official state dict (model.pth or .safetensors), or "
                        "the folder of a run (<out>/model.safetensors or <out>/<class>/model.safetensors)")
    cli.add_data_args(p, datasets.DATASETS, defaults={"batch-size": str(Options.batch_size)})
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
    p.add_argument("--bank-size", type=cli.number(), metavar="N",
                   help="the baseline's memory bank: at most N tokens per class, a seeded random subset (default "
                        "line.knn.BANK_SIZE)")
    p.add_argument("--streaming", action="store_true",
                   help="pixel metrics from 65536-bin histograms (constant memory; error bounds in metrics.json)")
    p.add_argument("--map-dtype", choices=["float32", "float16"], default="float32",
                   help="storage of maps for exact metrics (default float32); float16 halves it, rounding the scores")
    p.add_argument("--save-maps", type=cli.number(low=0), default=0, metavar="N",
                   help="per class, pictures of the N most and N least anomalous test images")
    cli.add_picture_args(p)
    args = p.parse_args(argv)
    cli.check_picture_args(args)
    return args


@dataclass
class Job:
    """One model scored on one data set."""
    ckpt: Path
    meta: dict  # what the checkpoint records
    data_set: scoring.DataSet
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
    wanted = set(datasets.split_list(args.classes)) - {"all"}
    jobs = []
    for ckpt in ckpts:
        meta = inpformer.read_checkpoint_metadata(ckpt)
        trained = datasets.split_list(meta.get("classes")) or [ckpt.parent.name]
        classes = [c for c in trained if not wanted or c in wanted]
        if not classes:
            continue
        name = (datasets.split_list(meta.get("data")) or [sets[0].data])[0]
        roots = datasets.split_list(args.data_root) or datasets.split_list(meta.get("data_root")) or [sets[0].root]
        root = roots[0]
        jobs.append(Job(ckpt, meta, scoring.DataSet(name, root, classes, own=True), out / ckpt.parent.name, "all"))
    if not jobs:
        raise ValueError(f"{args.ckpt}: no model for --classes {args.classes}")
    return jobs


def main(argv=None, log=cli.log):
    args = parse_args(argv)
    device, precision = cli.device_and_precision(args)
    ckpts = scoring.checkpoint_files(args.ckpt)
    base = Path(args.ckpt) if Path(args.ckpt).is_dir() else ckpts[0].parent  # outputs go beside the model(s)
    first_model = scoring.load_ready(ckpts[0], device, precision)  # a file that is no checkpoint fails here
    first = inpformer.read_checkpoint_metadata(ckpts[0])
    sets = scoring.plan_data_sets(first, ckpts[0], args.data, args.data_root, args.classes)
    foreign = [s.data for s in sets if s.own is False]
    if foreign and not args.zero_shot:
        log(f"note: {ckpts[0]} was trained on {first.get('data')}, not {', '.join(foreign)}; the paper's zero-shot "
            "protocol uses INP-distance maps: add --zero-shot")
    suffix = "".join(f"-{d}" for d in foreign) + "-zero-shot" * args.zero_shot + "-full-res" * args.full_res
    suffix += "-adeval" * (args.metrics == "adeval")
    out = args.out or base / f"eval{suffix}"
    jobs = plan_jobs(args, ckpts, first, sets, out)
    opts = Options(batch_size=args.batch_size or Options.batch_size, device=str(device), precision=precision,
                   workers=cli.workers(args.workers), zero_shot=args.zero_shot, full_res=args.full_res,
                   streaming=args.streaming, map_dtype=args.map_dtype, metrics=args.metrics, save_maps=args.save_maps,
                   baseline=args.baseline, bank_size=args.bank_size)
    results, written = {}, []
    for job in jobs:
        model = first_model if job.ckpt == ckpts[0] else scoring.load_ready(job.ckpt, device, precision)
        geometry = scoring.asked_geometry(model, args, job.ckpt, log)
        calibration = None if args.zero_shot else scoring.read_calibration(job.meta, job.ckpt, log)
        if args.outline and not calibration:
            log(f"note: --outline draws the calibrated pixel threshold, and {job.ckpt} has no calibration")
        pictures = scoring.PictureStyle(calibration, args.outline, args.heat_range)
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
    cli.guard(main)
