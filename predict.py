"""The production line: learn a decision rule and store it in the checkpoint (--calibrate), score new images
with decisions and pictures (--images), and export the scoring path as ONNX (--export).

    python predict.py --ckpt runs/line7/model.safetensors --calibrate --data folder --data-root held_out/
    python predict.py --ckpt runs/line7/model.safetensors --images new_parts/ --outline      # scores, decisions, maps
    python predict.py --ckpt runs/line7/model.safetensors --export line7.onnx   # anomaly_map, score [, normalised]

--calibrate scores a labelled set in MVTec layout (default: the checkpoint's own test set; give held-out images
with --data folder --data-root DIR) and stores the rule (see calibration()) in the checkpoint's metadata, every
tensor unchanged; an authors' model.pth is left as it is and a calibrated model.safetensors is written beside
it. --images writes predictions.csv (path, class, score, normalised_score, decision, heatmap) and
heatmaps/*.png under --out (default `predictions/` beside the checkpoint); an image takes the threshold of the
class named by --classes, else the pooled one. Without a calibration it writes scores only.
"""
import contextlib
import copy
import dataclasses
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import cli
import data as datasets  # the module; `data` is the name of a data set in the functions below
import inpformer
import metrics
import scoring

# -----------------------------------------------------------------------------------------------------
# Calibration: a decision rule learnt on labelled images


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
    normal = scores[~labels]
    weights = hist.normal / hist.normal.sum()  # normal pixels per bin, as fractions
    centres = hist.lo + (np.arange(hist.bins) + 0.5) * hist.resolution
    p_mean = float(weights @ centres)
    p_median = float(centres[np.searchsorted(np.cumsum(weights), 0.5)])
    p_std = float(np.sqrt(weights @ (centres - p_mean) ** 2))
    if labels.any():
        image_t, image_rule = metrics.f1_threshold(labels, scores)[1], "f1-max"
    else:
        image_t, image_rule = normal.mean() + sigmas * normal.std(), f"normal mean + {sigmas:g} std"
    if hist.n_regions:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixel_t, pixel_rule = hist.compute(thresholds=True)["P-threshold"], "f1-max"
    else:
        pixel_t, pixel_rule = p_mean + sigmas * p_std, f"normal mean + {sigmas:g} std"
    above = pixel_t - p_median if pixel_t > p_median else 3 * p_std
    return dict(rule=dict(image=image_rule, pixel=pixel_rule), image_threshold=float(image_t),
                pixel_threshold=float(pixel_t), score_range=[float(scores.min()), float(scores.max())],
                heat_range=[p_median, p_median + 2 * above],
                normal=dict(images=int(normal.size), score_mean=float(normal.mean()), score_std=float(normal.std()),
                            score_max=float(normal.max()), pixel_median=p_median, pixel_mean=p_mean, pixel_std=p_std),
                anomalous_images=int(labels.sum()))


def calibration_images(data_set: scoring.DataSet, geometry) -> dict:
    """{class: ImageDataset} of the test images of `data_set` to calibrate on; at least one must be normal."""
    classes = datasets.resolve_classes(data_set.data, data_set.root, data_set.classes)
    test_sets = {c: datasets.test_set(data_set.data, data_set.root, c, geometry) for c in classes}
    if not any(s.label == 0 for ds in test_sets.values() for s in ds.samples):
        raise ValueError(f"{data_set.root}: no normal test image of {data_set.data} to calibrate on")
    return test_sets


def calibrate_on(model, data_set: scoring.DataSet, opts: scoring.Options, log=print) -> dict:
    """Score every test image of `data_set` and learn the rule: calibration() pooled over its classes, plus each
    class's own F1-max image threshold where the class has anomalies ("classes"), the classes it was learnt on
    ("class_names") and the geometry it was learnt at."""
    model = scoring.ready_model(model, opts.device, opts.precision)
    geometry = opts.geometry or model.config.geometry
    test_sets = calibration_images(data_set, geometry)
    progress = scoring.Progress(sum(len(ds) for ds in test_sets.values()), log)
    labels, scores, per_class, pooled = [], [], {}, metrics.PixelHistogram()
    for cls, ds in test_sets.items():
        has_masks = not any(s.label and s.mask is None for s in ds.samples)
        class_labels, class_scores = [], []
        for batch, maps, batch_scores in scoring.scored_batches(model, ds, opts.batch_size, opts.workers):
            masks = scoring.masks_at_map_size(batch["mask"])
            if has_masks:
                pooled.update(masks, maps)
            else:  # no masks for this class's anomalies: only the normal images' pixels have known labels
                normal = batch["label"] == 0
                pooled.update(masks[normal], maps[normal])
            class_labels += batch["label"].tolist()
            class_scores += batch_scores.tolist()
            progress.step(len(batch_scores), cls)
        if any(class_labels):
            per_class[cls] = metrics.f1_threshold(class_labels, class_scores)[1]
        labels += class_labels
        scores += class_scores
    rule = calibration(labels, scores, pooled)
    rule.update(image_size=geometry.image_size, crop_size=geometry.crop_size, classes=per_class,
                class_names=list(test_sets))
    return rule


def calibration_target(path) -> Path:
    """The file --calibrate writes: the checkpoint itself, or beside an official .pth its .safetensors twin."""
    path, target = Path(path), Path(path).with_suffix(".safetensors")
    if path != target and target.exists():
        raise ValueError(f"{target}: exists; calibrate that file instead of {path}")
    return target


def write_calibration(path, rule, data_set: scoring.DataSet = None) -> Path:
    """Store the calibration `rule` in a project checkpoint's metadata: the file is rewritten atomically, every
    tensor as it was. An official state dict (.pth) is left alone and a calibrated project checkpoint is written
    beside it, recording the data of `data_set`. Returns the file written."""
    from safetensors.torch import save_file

    target = calibration_target(path)
    if Path(path) != target:
        meta = inpformer.Metadata(calibration=rule, classes=rule.get("class_names", list(rule["classes"])))
        if data_set is not None:
            meta.data, meta.data_root = data_set.data, str(data_set.root)
        model = inpformer.load_model(path)
        model.config.geometry = inpformer.Geometry(rule["image_size"], rule["crop_size"])
        inpformer.save_checkpoint(model, target, meta)
        return target
    tensors, strings = inpformer.read_state_dict(path)
    meta = inpformer.Metadata.from_strings(strings)
    meta.calibration = rule
    kept = {k: strings[k] for k in ("format", "inpformer_config") if k in strings}
    with inpformer.atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={**kept, **meta.to_strings()})
    return target

# -----------------------------------------------------------------------------------------------------
# Scores, decisions and pictures for new images


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


def unique_name(path, used) -> str:
    """The stem of `path`, with _2, _3, ... when another image of that stem (in another folder) took it."""
    stem = Path(path).stem
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name


def predict_images(model, files, opts=scoring.Options(), out_dir=None, cls=None, log=print):
    """Score unlabelled images: [dict(path, class, score, and with a calibration threshold, normalised,
    decision; heatmap)], and with out_dir predictions.csv and heatmaps/<name>.png. Every image takes the
    threshold of class `cls` (only when named: never guessed from a path), else the pooled one. The heat maps
    share one scale: opts.pictures', else min..max over all these images (their maps then wait in memory,
    0.3 MB each, until all are scored)."""
    model = scoring.ready_model(model, opts.device, opts.precision)
    geometry = opts.geometry or model.config.geometry
    samples = [datasets.Sample(str(f), None, 0, "", "") for f in files]
    dataset = datasets.ImageDataset(samples, geometry)
    style, cal = opts.pictures, opts.pictures.calibration
    scale = style.scale()
    heat_dir = Path(out_dir) / "heatmaps" if out_dir else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)
    progress, rows, used, waiting = scoring.Progress(len(files), log), [], set(), []
    for batch, maps, scores in scoring.scored_batches(model, dataset, opts.batch_size, opts.workers, opts.zero_shot):
        for i, path in enumerate(batch["path"]):
            score = float(scores[i])
            row = {"path": path, "class": cls or "", "score": score}
            if cal:
                row.update(scoring.decide(score, cal, cls))
            rows.append(row)
            if heat_dir is None:
                continue
            row["heatmap"] = f"{unique_name(path, used)}.png"
            picture = dict(image=scoring.to_rgb(batch["image"][i]), map=maps[i].half(),
                           title=style.title(path, score, cls), file=heat_dir / row["heatmap"])
            if scale:
                _draw(picture, scale, style)
            else:  # drawn once every map is known, on their common min..max
                waiting.append(picture)
        progress.step(len(scores), "images")
    if waiting:
        lo = min(float(w["map"].min()) for w in waiting)
        hi = max(float(w["map"].max()) for w in waiting)
        for w in waiting:
            _draw(w, (lo, hi, f"min..max of {len(waiting)} images"), style)
    if out_dir:  # without a calibration normalised_score and decision stay empty
        header = ["path", "class", "score", "normalised_score", "decision", "heatmap"]
        columns = ["path", "class", "score", "normalised", "decision", "heatmap"]
        scoring.write_csv(Path(out_dir) / "predictions.csv", header, [[r.get(k, "") for k in columns] for r in rows])
    n_bad = sum(r.get("decision") == "anomalous" for r in rows)
    summary = f"scored {len(rows)} images, {progress.rate():.1f} img/s; "
    if cal:
        t = scoring.class_threshold(cal, cls)
        which = f"class {cls}" if cls in cal.get("classes", {}) else "pooled"
        rule = cal.get("rule", {}).get("image", "stored")
        summary += f"{n_bad} anomalous, {len(rows) - n_bad} normal ({which} threshold {t:.4g}, {rule})"
    else:
        summary += "no decisions: the checkpoint has no calibration (add one with predict.py --calibrate)"
    log(summary)
    return rows


def _draw(waiting, scale, style):
    amap = waiting["map"].float().numpy()
    scoring.picture(waiting["image"], amap, scale, waiting["title"], outline=style.outline_threshold()).save(
        waiting["file"])

# -----------------------------------------------------------------------------------------------------
# ONNX export


class ExportGraph(torch.nn.Module):
    """model.predict at one input size as one exportable graph: the interpolated position table becomes a
    constant (the bicubic interpolation does not export), and a calibration adds the normalised score."""

    def __init__(self, model, crop_size, calibration=None):
        super().__init__()
        self.model, self.calibration = copy.deepcopy(model).float().eval(), calibration
        encoder, grid = self.model.encoder, crop_size // model.encoder.config.patch_size
        with torch.no_grad():
            encoder.pos_embed = torch.nn.Parameter(encoder.interpolate_pos_encoding(grid, grid))
        encoder.config = dataclasses.replace(encoder.config, pos_grid=grid)

    def forward(self, x):
        maps, scores = self.model.predict(x)
        cal = self.calibration
        if not cal:
            return maps, scores
        return maps, scores, scoring.normalise(scores, cal, cal["image_threshold"])


def export_onnx(model, path, opts=scoring.Options(), images=None, log=print):
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
    geometry = opts.geometry or model.config.geometry
    cal, c = opts.pictures.calibration, geometry.crop_size
    # The graph is fp32 whatever --precision says: a model cast to bf16 first would lose its weights' precision.
    graph = ExportGraph(scoring.ready_model(model, "cpu", "fp32"), c, cal)
    names = ["anomaly_map", "score"] + (["normalised_score"] if cal else [])
    x = torch.randn(3, 3, c, c, generator=torch.Generator().manual_seed(0))
    for i, f in enumerate(image_files(images)[:3] if images else []):  # the given images first
        x[i] = datasets.load_image(f, geometry)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with inpformer.atomic_write(path) as tmp:  # checked before it is named `path`
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, (x[:2],), tmp, dynamo=True, external_data=False, input_names=["image"],
                                  output_names=names, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        except Exception as e:  # the exporter's and onnxruntime's own errors, as one line
            raise ValueError(f"{path}: the export failed ({inpformer.first_line(e)})") from e
        for b in (1, 3):
            t0 = time.perf_counter()
            with torch.no_grad():
                want = graph(x[:b])
            t1 = time.perf_counter()
            got = [torch.from_numpy(a) for a in session.run(None, {"image": x[:b].numpy()})]
            t2 = time.perf_counter()
            diffs = [float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want)]
            shown = ", ".join(f"{n} {d:.2e}" for n, d in zip(names, diffs))
            log(f"  batch {b}: max |onnx - torch| / max |torch|: {shown}; {1e3 * (t2 - t1) / b:.0f} ms/image "
                f"onnxruntime, {1e3 * (t1 - t0) / b:.0f} ms/image torch")
            if max(diffs) > 1e-4:
                raise ValueError(f"{path}: the ONNX outputs differ from PyTorch's by {max(diffs):.2e} of their maximum")
        size = Path(tmp).stat().st_size
    log(f"wrote {path} ({size / 2**20:.1f} MiB): {geometry.describe()} input, outputs {', '.join(names)}"
        + ("" if cal else " (no calibration, so no normalised_score)"))
    return Path(path)

# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = cli.script_parser(__doc__)
    p.add_argument("--ckpt", required=True,
                   help="project checkpoint (.safetensors), official state dict (model.pth or .safetensors), or "
                        "the folder of a run (--calibrate: each model of a single-class run on its own class)")
    what = p.add_argument_group("what to do (one of)")
    what.add_argument("--calibrate", action="store_true",
                      help="learn the decision rule on a labelled set (--data/--data-root, default the checkpoint's "
                           "test set) and store it in the checkpoint, its tensors untouched")
    what.add_argument("--images", nargs="+", metavar="PATH",
                      help="score these images or folders: predictions.csv + heatmaps/*.png")
    what.add_argument("--export", type=Path, metavar="OUT.onnx",
                      help="write the scoring path as ONNX (anomaly_map, score [, normalised_score]) and check it "
                           "with onnxruntime (on the --images given, else on random inputs)")
    cli.add_data_args(p, datasets.DATASETS, defaults={
        "batch-size": str(scoring.Options.batch_size),
        "classes help": "--calibrate: the classes to calibrate on, \"all\" or a comma list (default: the checkpoint's); "
                        "--images: the one class whose threshold to use (default: the pooled threshold)"})
    p.add_argument("--out", type=Path, help="output folder of --images (default: <checkpoint folder>/predictions)")
    p.add_argument("--zero-shot", action="store_true",
                   help="--images: anomaly map = INP distance (scores only: calibrations are for reconstruction maps)")
    cli.add_picture_args(p)
    args = p.parse_args(argv)
    cli.check_picture_args(args)
    if not (args.calibrate or args.images or args.export):
        raise ValueError("give --calibrate, --images PATH or --export OUT.onnx (see --help)")
    if args.calibrate and (args.images or args.export):
        raise ValueError("--calibrate learns from a labelled set: run --images and --export on their own")
    if args.calibrate and args.zero_shot:
        raise ValueError("--calibrate learns the decision rule of the reconstruction maps; drop --zero-shot")
    if args.export and args.zero_shot:
        raise ValueError("--export writes the reconstruction maps; drop --zero-shot")
    return args


def main(argv=None, log=cli.log):
    args = parse_args(argv)
    device, precision = cli.device_and_precision(args)
    ckpts = scoring.checkpoint_files(args.ckpt)
    if (args.images or args.export) and len(ckpts) > 1:
        raise ValueError(f"{args.ckpt}: --images and --export need one model file, not a folder of {len(ckpts)}")
    if args.calibrate:
        return calibrate_main(args, ckpts, device, precision, log)

    model = scoring.load_ready(ckpts[0], device, precision)
    meta = inpformer.read_metadata(ckpts[0])
    cal = None if args.zero_shot else scoring.read_calibration(meta, ckpts[0], log)
    geometry = scoring.asked_geometry(model, args.image_size, args.crop_size, ckpts[0], log)
    if cal and "image_size" in cal:
        calibrated_at = inpformer.Geometry(cal["image_size"], cal["crop_size"])
        if calibrated_at != geometry:
            log(f"note: {ckpts[0]} was calibrated at {calibrated_at.describe()}, not {geometry.describe()}: its "
                "thresholds may not hold")
    if args.outline and not cal:
        log(f"note: --outline draws the calibrated pixel threshold, and {ckpts[0]} has no calibration")
    opts = scoring.Options(batch_size=args.batch_size or scoring.Options.batch_size, device=str(device),
                           precision=precision, workers=cli.workers(args.workers), geometry=geometry,
                           zero_shot=args.zero_shot,
                           pictures=scoring.PictureStyle(cal, args.outline, args.heat_range))
    if args.export:
        export_onnx(model, args.export, opts, args.images, log)
        return 0

    calibrated = (cal or {}).get("class_names", list((cal or {}).get("classes", {})))
    if args.classes and ("," in args.classes or (cal and args.classes not in calibrated)):
        known = f" (calibrated: {', '.join(calibrated)})" if cal else ""
        raise ValueError(f"--classes {args.classes}: with --images, one class whose threshold to use{known}")
    files = image_files(args.images)
    out = args.out or ckpts[0].parent / "predictions"
    log(f"{ckpts[0]}: scoring {len(files)} images at {geometry.describe()} on {device}")
    predict_images(model, files, opts, out, args.classes, log)
    log(f"wrote {out / 'predictions.csv'} and {out / 'heatmaps'}/")
    return 0


def calibrate_main(args, ckpts, device, precision, log):
    """--calibrate: each model file on its data set (a single-class run folder: each model on its own class)."""
    plans = []
    for ckpt in ckpts:  # everything checked before anything is scored
        meta = inpformer.read_metadata(ckpt)
        classes = args.classes
        if classes is None and len(ckpts) > 1:  # a single-class run: each model on its own class
            classes = ",".join(datasets.split_list(meta.classes))
        sets = scoring.plan_data_sets(meta, ckpt, args.data, args.data_root, classes)
        if len(sets) > 1:
            raise ValueError("--calibrate learns one rule per model: calibrate it on one data set")
        calibration_target(ckpt)
        calibration_images(sets[0], inpformer.Geometry())  # lists them, and needs a normal one
        plans.append((ckpt, meta, sets[0]))
    for ckpt, meta, data_set in plans:
        model = scoring.load_ready(ckpt, device, precision)
        geometry = scoring.asked_geometry(model, args.image_size, args.crop_size, ckpt, log)
        opts = scoring.Options(batch_size=args.batch_size or scoring.Options.batch_size, device=str(device),
                               precision=precision, workers=cli.workers(args.workers), geometry=geometry)
        log(f"{ckpt}: calibrating on {data_set.data} in {data_set.root}")
        rule = calibrate_on(model, data_set, opts, log)
        target = write_calibration(ckpt, rule, data_set)
        replaced = " (its earlier calibration replaced, as --calibrate asked)" if meta.calibration else ""
        per_class = ", ".join(f"{c} {t:.4g}" for c, t in rule["classes"].items())
        log(f"calibrated {target}{replaced}: image threshold {rule['image_threshold']:.4g} ({rule['rule']['image']})"
            + (f", per class {per_class}" if per_class else "")
            + f"; pixel threshold {rule['pixel_threshold']:.4g} ({rule['rule']['pixel']})")
    return 0


if __name__ == "__main__":
    cli.guard(main)
