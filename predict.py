"""The production line: learn a decision rule and store it in the checkpoint (--calibrate), score new images
with decisions and pictures (--images), and export the scoring path as ONNX (--export).

    python predict.py --ckpt runs/line7/model.safetensors --calibrate --data folder --data-root held_out/
    python predict.py --ckpt runs/line7/model.safetensors --images new_parts/ --outline      # scores, decisions, maps
    python predict.py --ckpt runs/line7/model.safetensors --export line7.onnx   # anomaly_map, score [, normalised]

--calibrate scores a labelled set in MVTec layout (default: the checkpoint's own test set; give held-out images
with --data folder --data-root DIR) and stores the rule (see calibration()) in the checkpoint's metadata, every
tensor unchanged; an authors' model.pth is left as it is and a calibrated model.safetensors is written beside
it. On a calibrated model, --classes X replaces class X's thresholds only and keeps every other class's and the
pooled ones.
--images writes predictions.csv (path, class, score, normalised_score, decision, heatmap) and
heatmaps/*.png under --out (default `predictions/` beside the checkpoint); an image takes the threshold of the
class named by --classes, else the pooled one. Without a calibration it writes scores only.
"""
import contextlib
import copy
import io
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import inpformer
import line.decisions
import line.frames
import line.pictures
import metrics
import train

# -----------------------------------------------------------------------------------------------------
# Calibration: a decision rule learnt on labelled images


MAX_FALSE_PIXELS = 1e-4  # --max-false-pixels: the share of good pixels the region threshold may flag


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
    return dict(rule=dict(image=image_rule, pixel=pixel_rule), image_threshold=float(image_t),
                pixel_threshold=float(pixel_t), score_range=[float(scores.min()), float(scores.max())],
                heat_range=heat_range(pixel_t, p_median, p_std),
                normal=dict(images=int(normal.size), score_mean=float(normal.mean()), score_std=float(normal.std()),
                            score_max=float(normal.max()), pixel_median=p_median, pixel_mean=p_mean, pixel_std=p_std),
                anomalous_images=int(labels.sum()))


def heat_range(pixel_threshold, median, std):
    """Pictures' colour scale: from the median normal pixel to as far above the pixel threshold as the threshold
    is above the median (to 6 std above the median, should the threshold not be above it)."""
    above = pixel_threshold - median if pixel_threshold > median else 3 * std
    return [median, median + 2 * above]


def false_reject_threshold(good_scores, max_false_reject):
    """The conformal threshold for a false-reject budget P. With the n good scores sorted, s_(1) <= ... <= s_(n),
    and k = ceil((n + 1)(1 - P)), a new good part, its score exchangeable with these, scores above s_(k) with
    probability at most (n + 1 - k) / (n + 1) <= P. The threshold returned is the next float32 above s_(k)
    (scores are float32, in PyTorch and in the exported graph alike), so that "anomalous when score >=
    threshold" rejects exactly the scores above s_(k). Needs k <= n, i.e. n >= 1/P - 1 good images; else
    ValueError naming the smallest P these images support, 1 / (n + 1)."""
    good = np.sort(np.asarray(good_scores, np.float32))
    check_budget(len(good), max_false_reject)
    k = math.ceil((len(good) + 1) * (1 - Fraction(repr(float(max_false_reject)))))  # exact: no rounding at the ceiling
    return float(np.nextafter(good[k - 1], np.float32(np.inf)))


def check_budget(n, max_false_reject):
    """n good images support a false-reject budget P when n >= 1/P - 1 (see false_reject_threshold)."""
    p = Fraction(repr(float(max_false_reject)))
    if math.ceil((n + 1) * (1 - p)) > n:
        raise ValueError(f"--max-false-reject {float(p):g}: {n} good images support a budget of at least "
                         f"{1 / (n + 1):.4g} (1 / (n + 1)); calibrate on more good images (at least "
                         f"{math.ceil(1 / p - 1)}) or ask for a larger budget")


def pixel_budget_threshold(hist, max_false_pixels):
    """The lowest bin edge t of the histogram's normal pixels with at most `max_false_pixels` of them at or above
    t: the region threshold of a false-reject calibration (exact up to the histogram's resolution, erring high)."""
    from_top = np.cumsum(hist.normal[::-1])  # normal pixels in the highest bins
    bins_within = int(np.searchsorted(from_top, max_false_pixels * hist.normal.sum(), side="right"))
    return float(hist.lo + (hist.bins - bins_within) * hist.resolution)


def budget_calibration(scored, max_false_reject, max_false_pixels=MAX_FALSE_PIXELS, log=print):
    """The decision rule for a false-reject budget, from the good images of `scored` (a CalibrationSet): the
    pooled image threshold, and each class's own where its good images support the budget
    (false_reject_threshold), a pixel threshold flagging at most `max_false_pixels` of the good images' pixels
    (pixel_budget_threshold), and, where labelled defects are there, the share of them each threshold misses."""
    labels, scores, classes = scored.labels, scored.scores, np.asarray(scored.classes)
    rule = calibration(labels, scores, scored.pixels)  # normal statistics, score range
    pooled = false_reject_threshold(scores[~labels], max_false_reject)
    per_class = {}
    for c in dict.fromkeys(c for c in scored.classes if c):  # "": good images of no named class
        good = scores[(classes == c) & ~labels]
        try:
            per_class[c] = false_reject_threshold(good, max_false_reject)
        except ValueError:
            log(f"note: class {c}: its {len(good)} good images support no budget below {1 / (len(good) + 1):.3g}: "
                "it takes the pooled threshold")
    pixel_t = pixel_budget_threshold(scored.good_pixels, max_false_pixels)
    missed = {}
    for c in dict.fromkeys(scored.classes):
        bad = scores[(classes == c) & labels]
        if len(bad):
            missed[c] = float(np.mean(bad < per_class.get(c, pooled)))
    normal = rule["normal"]
    rule.update(rule=dict(image=f"false-reject budget {max_false_reject:g} (conformal)",
                          pixel=f"good pixels above it at most {max_false_pixels:g}"),
                image_threshold=pooled, pixel_threshold=pixel_t, classes=per_class,
                heat_range=heat_range(pixel_t, normal["pixel_median"], normal["pixel_std"]),
                max_false_reject=max_false_reject, max_false_pixels=max_false_pixels)
    if labels.any():
        rule["miss_rate"] = dict(classes=missed, pooled=float(np.mean(scores[labels] < pooled)))
    return rule


@dataclass
class CalibrationSet:
    """A calibration set scored: per image its class, label and score; a histogram of the maps' pixels (the
    normal ones, and the anomalous ones where masks say so), and one of the good images' pixels alone."""
    classes: list
    labels: np.ndarray
    scores: np.ndarray
    pixels: metrics.PixelHistogram
    good_pixels: metrics.PixelHistogram


def calibration_samples(data_set: evaluate.DataSet) -> dict:
    """{class: [Sample]} of the images of `data_set` to calibrate on (its test images, or the validation split of
    a data set that has one, data.CALIBRATION_SPLIT), every file checked; at least one must be good."""
    classes = data.resolve_classes(data_set.data, data_set.root, data_set.classes)
    split = data.CALIBRATION_SPLIT.get(data_set.data, "test")
    found = {}
    for c in classes:
        found[c] = data.list_samples(data_set.data, data_set.root, c, split)
        data.check_samples(found[c])
    if not any(s.label == 0 for samples in found.values() for s in samples):
        raise ValueError(f"{data_set.root}: no good image of {data_set.data} ({split} split) to calibrate on")
    return found


def good_samples(files, cls) -> dict:
    """{class: [Sample]} of unlabelled images taken as good parts of class `cls` ("" for no class), checked."""
    samples = [data.Sample(str(f), None, 0, cls or "", "good") for f in files]
    data.check_samples(samples)
    return {cls or "": samples}


def score_calibration_set(model, test_sets, opts, log=print) -> CalibrationSet:
    """Every image of `test_sets` ({class: ImageDataset}) scored, with a histogram of its maps' pixels."""
    model = evaluate.ready_model(model, opts.device, opts.precision)
    progress = evaluate.Progress(sum(len(ds) for ds in test_sets.values()), log)
    classes, labels, scores = [], [], []
    pixels, good_pixels = metrics.PixelHistogram(), metrics.PixelHistogram()
    for cls, ds in test_sets.items():
        has_masks = not any(s.label and s.mask is None for s in ds.samples)
        for batch, maps, batch_scores in evaluate.scored_batches(model, ds, opts.batch_size, opts.workers):
            masks = evaluate.masks_at_map_size(batch["mask"])
            normal = batch["label"] == 0
            if has_masks:
                pixels.update(masks, maps)
            else:  # no masks for this class's anomalies: only the normal images' pixels have known labels
                pixels.update(masks[normal], maps[normal])
            good_pixels.update(masks[normal], maps[normal])
            classes += [cls] * len(batch_scores)
            labels += batch["label"].tolist()
            scores += batch_scores.tolist()
            progress.step(len(batch_scores), cls or "images")
    return CalibrationSet(classes, np.asarray(labels, bool), np.asarray(scores, np.float64), pixels, good_pixels)


def calibrate_on(model, test_sets, opts: evaluate.Options, max_false_reject=None, max_false_pixels=MAX_FALSE_PIXELS,
                 log=print) -> dict:
    """Score `test_sets` ({class: ImageDataset}) and learn the rule: with a false-reject budget, the conformal
    thresholds of budget_calibration; else calibration(), pooled over the classes, plus each class's own F1-max
    image threshold where the class has anomalies. Both record "classes" (the per-class thresholds),
    "class_names" (every class learnt on), "class_rules" (how each class is decided, on how many images, when),
    "when" and the geometry."""
    scored = score_calibration_set(model, test_sets, opts, log)
    classes = np.asarray(scored.classes)
    if max_false_reject is not None:
        rule = budget_calibration(scored, max_false_reject, max_false_pixels, log)
    else:
        rule = calibration(scored.labels, scored.scores, scored.pixels)
        per_class = {}
        for c in test_sets:
            of_class = classes == c
            if scored.labels[of_class].any():
                per_class[c] = metrics.f1_threshold(scored.labels[of_class], scored.scores[of_class])[1]
        rule["classes"] = per_class
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    class_rules = {}
    for c in test_sets:
        if not c:  # good images of no named class: the pooled rule is theirs
            continue
        of_class = classes == c
        image_rule = rule["rule"]["image"] if c in rule["classes"] else "the pooled threshold"
        class_rules[c] = dict(rule=dict(image=image_rule, pixel="the pooled threshold"), images=int(of_class.sum()),
                              anomalous=int(scored.labels[of_class].sum()), when=when)
    geometry = opts.geometry or data.geometry_of(model.config.geometry)
    rule.update(geometry=geometry.to_dict(), class_names=[c for c in test_sets if c], when=when,
                class_rules=class_rules)
    return rule


def with_classes(earlier, learnt) -> dict:
    """The rule `earlier` with the classes of `learnt` ({class: the rule calibrate_on learnt on that class's images
    alone}) replaced: each class takes its rule's image and pixel thresholds, score and heat ranges, and its record;
    every other class and the pooled thresholds stay as they were, bit for bit, and so does the pooled rule's
    record (its normal statistics, miss rate and date, of the images it was learnt on)."""
    rule = copy.deepcopy(earlier)
    rule.setdefault("classes", {})
    rule.setdefault("class_rules", {})
    for c, own in learnt.items():
        rule["classes"][c] = own["image_threshold"]
        record = dict(own["class_rules"][c], rule=own["rule"])
        record.update({k: own[k] for k in ("pixel_threshold", "score_range", "heat_range")})
        if "miss_rate" in rule:  # the pooled calibration's figure for this class no longer holds
            rule["miss_rate"]["classes"].pop(c, None)
        if "miss_rate" in own:
            record["miss_rate"] = own["miss_rate"]["pooled"]
        rule["class_rules"][c] = record
    earlier_names = earlier.get("class_names", list(earlier.get("classes", {})))
    rule["class_names"] = list(dict.fromkeys([*earlier_names, *learnt]))
    return rule


def training_images(meta: dict) -> set:
    """The resolved paths of the images the checkpoint was trained on (empty when it does not say)."""
    found = set()
    names, roots = data.split_list(meta.get("data")), data.split_list(meta.get("data_root"))
    per_set = meta.get("classes_per_set")
    if not isinstance(per_set, list):
        per_set = [meta.get("classes")] * len(names)
    for name, root, classes in zip(names, roots, per_set):
        with contextlib.suppress(ValueError, OSError):  # the data moved or changed: nothing to compare
            for c in data.resolve_classes(name, root, classes):
                found |= {str(Path(s.image).resolve()) for s in data.list_samples(name, root, c, "train")}
    return found


def calibration_geometry(rule):
    """The geometry a calibration was learnt at, or None when it does not say (or says it unreadably)."""
    if not rule:
        return None
    with contextlib.suppress(TypeError, KeyError, ValueError):
        if "geometry" in rule:
            return data.geometry_of(rule["geometry"])
        if "image_size" in rule:  # calibrations written before the geometry had tiles
            return data.geometry_of({"image_size": rule["image_size"], "crop_size": rule["crop_size"]})
    return None


def calibration_target(path) -> Path:
    """The file --calibrate writes: the checkpoint itself, or beside an official .pth its .safetensors twin."""
    path, target = Path(path), Path(path).with_suffix(".safetensors")
    if path != target and target.exists():
        raise ValueError(f"{target}: exists; calibrate that file instead of {path}")
    return target


def write_calibration(path, rule, data_set: evaluate.DataSet = None) -> Path:
    """Store the calibration `rule` in a project checkpoint's metadata: the file is rewritten atomically, every
    tensor as it was. An official state dict (.pth) is left alone and a calibrated project checkpoint is written
    beside it, recording the data of `data_set`. Returns the file written."""
    from safetensors.torch import save_file

    target = calibration_target(path)
    if Path(path) != target:
        meta = dict(calibration=rule, classes=rule.get("class_names", list(rule["classes"])))
        if data_set is not None:
            meta.update(data=data_set.data, data_root=str(data_set.root))
        model = inpformer.load_model(path)
        if calibration_geometry(rule) is not None:
            model.config.geometry = calibration_geometry(rule).to_dict()
        inpformer.save_checkpoint(model, target, meta)
        return target
    tensors, strings = inpformer.read_state_dict(path)
    kept = {k: strings[k] for k in ("format", "inpformer_config") if k in strings}
    meta = {k: v for k, v in inpformer.decode_metadata(strings).items() if k not in kept}
    meta["calibration"] = rule
    with inpformer.atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata={**kept, **{k: json.dumps(v) for k, v in meta.items()}})
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
        files += data.images_in(spec, "**/*") if spec.is_dir() else [spec]
    if not files:
        raise ValueError(f"{', '.join(map(str, specs))}: no images ({', '.join(data.IMAGE_SUFFIXES)})")
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


@dataclass
class Region:
    """A connected region of an image's map at or above the calibrated pixel threshold, in the image's pixels."""
    id: int
    area: int        # pixels
    box: tuple       # (left, top, right, bottom), right and bottom exclusive
    max_score: float
    mean_score: float


@dataclass
class RegionRule:
    """How --images finds regions and decides: regions of at least min_area pixels count; decide_by "score"
    (the image threshold, the default) or "regions" (anomalous when any region counts); save_masks writes each
    image's counted regions as a binary mask PNG of its own size."""
    min_area: int = 1
    decide_by: str = "score"
    save_masks: bool = False


def native_map(amap, path, geometry) -> np.ndarray:
    """An image's (256, 256) map at the image's own size: resized into the part of it the model saw (the crop
    box, or the whole image); -inf elsewhere, so that what a crop never saw is never flagged."""
    width, height = data.image_size(path)
    left, top, right, bottom = data.crop_box(width, height, geometry)
    full = np.full((height, width), -np.inf, np.float32)
    inner = F.interpolate(torch.as_tensor(amap, dtype=torch.float32)[None, None], size=(bottom - top, right - left),
                          mode="bilinear", align_corners=False)
    full[top:bottom, left:right] = inner[0, 0].numpy()
    return full


def find_regions(amap, threshold, min_area=1) -> tuple:
    """(mask, [Region]): the 8-connected regions of amap >= threshold with at least min_area pixels, numbered from
    1 in raster order of their first pixel, and the bool mask of their pixels."""
    labels, n = metrics.label_components(amap >= threshold)
    if n == 0:
        return np.zeros(amap.shape, bool), []
    rows, cols = np.nonzero(labels)  # the flagged pixels, in raster order
    ids, values = labels[rows, cols], amap[rows, cols].astype(np.float64)
    area = np.bincount(ids, minlength=n + 1)
    total = np.bincount(ids, weights=values, minlength=n + 1)
    top, left = np.full(n + 1, amap.shape[0]), np.full(n + 1, amap.shape[1])
    bottom, right, peak = np.zeros(n + 1, int), np.zeros(n + 1, int), np.full(n + 1, -np.inf)
    np.minimum.at(top, ids, rows)
    np.minimum.at(left, ids, cols)
    np.maximum.at(bottom, ids, rows + 1)
    np.maximum.at(right, ids, cols + 1)
    np.maximum.at(peak, ids, values)
    kept = [k for k in range(1, n + 1) if area[k] >= min_area]
    regions = [Region(i, int(area[k]), (int(left[k]), int(top[k]), int(right[k]), int(bottom[k])), float(peak[k]),
                      float(total[k] / area[k])) for i, k in enumerate(kept, start=1)]
    keep = np.zeros(n + 1, bool)
    keep[kept] = True
    return keep[labels], regions


def predict_images(model, files, opts=evaluate.Options(), out_dir=None, cls=None, log=print, rule=RegionRule()):
    """Score unlabelled images: [dict(path, class, score; with a calibration threshold, normalised, decision,
    regions, largest_area; heatmap)], and with out_dir predictions.csv, regions.csv, heatmaps/<name>.png and with
    rule.save_masks masks/<name>.png. Every image takes the threshold of class `cls` (only when named: never
    guessed from a path), else the pooled one. Regions (find_regions on the map at the image's own size) need a
    calibration's pixel threshold. The heat maps share one scale: opts.pictures', else min..max over all these
    images (their maps then wait in memory, 0.3 MB each, until all are scored)."""
    model = evaluate.ready_model(model, opts.device, opts.precision)
    geometry = opts.geometry or data.geometry_of(model.config.geometry)
    samples = [data.Sample(str(f), None, 0, "", "") for f in files]
    dataset = data.ImageDataset(samples, geometry)
    style, cal = opts.pictures, opts.pictures.calibration
    scale = style.scale(cls)
    pixel_threshold = line.decisions.class_rule(cal, cls)["pixel_threshold"] if cal else None
    out = Path(out_dir) if out_dir else None
    for folder in ("heatmaps", "masks") if out else ():
        if folder == "heatmaps" or rule.save_masks:
            (out / folder).mkdir(parents=True, exist_ok=True)
    progress = evaluate.Progress(len(files), log)
    rows, region_rows = [], []  # predictions.csv, regions.csv
    used, waiting = set(), []   # picture names taken; pictures waiting for the common colour scale
    for batch, maps, scores in evaluate.scored_batches(model, dataset, opts.batch_size, opts.workers, opts.zero_shot):
        for i, path in enumerate(batch["path"]):
            score = float(scores[i])
            row = {"path": path, "class": cls or "", "score": score}
            name = unique_name(path, used)
            if cal:
                row.update(line.decisions.decide(score, cal, cls))
                mask, regions = find_regions(native_map(maps[i], path, geometry), pixel_threshold, rule.min_area)
                row.update(regions=len(regions), largest_area=max((r.area for r in regions), default=0))
                if rule.decide_by == "regions":
                    row["decision"] = "anomalous" if regions else "normal"
                region_rows += [[path, cls or "", r.id, r.area, *r.box, r.max_score, r.mean_score] for r in regions]
                if out and rule.save_masks:
                    Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{name}.png")
            rows.append(row)
            if out is None:
                continue
            row["heatmap"] = f"{name}.png"
            title = style.title(path, score, cls)
            if cal and rule.decide_by == "regions":
                title = f"{Path(path).name}: score {score:.4g}, {row['regions']} regions {row['decision'].upper()}"
            picture = dict(image=line.pictures.to_rgb(batch["image"][i]), map=maps[i].half(), title=title,
                           file=out / "heatmaps" / row["heatmap"])
            if scale:
                _draw(picture, scale, style, cls)
            else:  # drawn once every map is known, on their common min..max
                waiting.append(picture)
        progress.step(len(scores), "images")
    if waiting:
        lo = min(float(w["map"].min()) for w in waiting)
        hi = max(float(w["map"].max()) for w in waiting)
        for w in waiting:
            _draw(w, (lo, hi, f"min..max of {len(waiting)} images"), style, cls)
    if out:  # without a calibration normalised_score, decision and the region columns stay empty
        header = ["path", "class", "score", "normalised_score", "decision", "regions", "largest_area", "heatmap"]
        columns = ["path", "class", "score", "normalised", "decision", "regions", "largest_area", "heatmap"]
        evaluate.write_csv(out / "predictions.csv", header, [[r.get(k, "") for k in columns] for r in rows])
        evaluate.write_csv(out / "regions.csv", ["image", "class", "region", "area", "left", "top", "right", "bottom",
                                                "max_score", "mean_score"], region_rows)
    n_bad = sum(r.get("decision") == "anomalous" for r in rows)
    summary = f"scored {len(rows)} images, {progress.rate():.1f} img/s; "
    if cal and rule.decide_by == "regions":
        summary += (f"{n_bad} anomalous, {len(rows) - n_bad} normal (any region of at least {rule.min_area} px over "
                    f"the pixel threshold {pixel_threshold:.4g}); {len(region_rows)} regions")
    elif cal:
        t = line.decisions.class_threshold(cal, cls)
        which, how = "pooled", cal.get("rule", {})
        if cls in cal.get("classes", {}):  # its own threshold: its record says how it was learnt
            which, how = f"class {cls}", cal.get("class_rules", {}).get(cls, {}).get("rule", how)
        rule_name = how.get("image", "stored")
        summary += f"{n_bad} anomalous, {len(rows) - n_bad} normal ({which} threshold {t:.4g}, {rule_name}); "
        summary += f"{len(region_rows)} regions of at least {rule.min_area} px"
    else:
        summary += "no decisions: the checkpoint has no calibration (add one with predict.py --calibrate)"
    log(summary)
    return rows


def _draw(waiting, scale, style, cls):
    amap = waiting["map"].float().numpy()
    outline = style.outline_threshold(cls)
    picture = line.pictures.picture(waiting["image"], amap, scale, waiting["title"], outline=outline)
    picture.save(waiting["file"], compress_level=line.pictures.PNG_LEVEL)

# -----------------------------------------------------------------------------------------------------
# ONNX export


def fixed_model(model, input_size):
    """An fp32 copy of `model` for one input size, its position table computed once for that token grid: the
    bicubic interpolation that makes it does not export."""
    fixed = copy.deepcopy(model).float().eval()
    p = fixed.encoder.config.patch_size
    grid = (input_size[0] // p, input_size[1] // p)
    with torch.no_grad():
        table = torch.nn.Parameter(fixed.encoder.interpolate_pos_encoding(*grid))
    fixed.encoder.pos_embed = table

    def positions(h, w):  # the grid this copy was made for: its table, as it is
        return fixed.encoder.pos_embed

    fixed.encoder.interpolate_pos_encoding = positions
    return fixed


class DecisionOutputs(torch.nn.Module):
    """The outputs both graphs end with: the map and score, and with a calibration the normalised score and the
    decision (true: anomalous) under one threshold, the named class's or the pooled one (line.decisions.decide's
    rule)."""

    def __init__(self, calibration=None, cls=None):
        super().__init__()
        self.calibration, self.cls = calibration, cls
        self.threshold = line.decisions.class_threshold(calibration, cls) if calibration else None

    def forward(self, maps, scores):
        if not self.calibration:
            return maps, scores
        normalised = line.decisions.normalise(scores, self.calibration, self.threshold, self.cls)
        return maps, scores, normalised, scores >= self.threshold


class NormalisedGraph(torch.nn.Module):
    """--export-input normalised: a float32 (B, 3, h, w) batch preprocessed as data.load_image does (the crop or
    the whole frame, not tiles) -> the model's maps and scores, and the decision outputs."""

    def __init__(self, model, geometry, calibration=None, cls=None):
        super().__init__()
        self.model, self.geometry = fixed_model(model, geometry.input_size()), geometry
        self.outputs = DecisionOutputs(calibration, cls)

    def forward(self, x):
        return self.outputs(*line.frames.score_as(self.geometry, self.model.raw_maps(x)))


class FrameGraph(torch.nn.Module):
    """The default export: raw frames as a camera delivers them, uint8 (B, H, W, 3), to maps, scores and
    decisions, with everything evaluation does in between: the resize to the geometry's frame size (bilinear,
    antialiased when shrinking, as PIL's resize is, but in float32 where PIL rounds to 8 bits), the crop,
    ImageNet normalisation, the model (over tiles for a tiled geometry, stitched and scored as
    line.frames.predict_tiled does), and the decision outputs. frame_size: the resized frame's (height, width);
    None for a geometry that sets it (the frame's own size needs a fixed input, --frame-size)."""

    def __init__(self, model, geometry, calibration=None, cls=None, frame_size=None):
        super().__init__()
        self.geometry, self.frame_size = geometry, frame_size or geometry.image_size
        self.model = fixed_model(model, geometry.input_size())
        self.outputs = DecisionOutputs(calibration, cls)
        self.register_buffer("mean", torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, frames):
        x = frames.permute(0, 3, 1, 2).float() / 255
        height, width = self.frame_size
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        top, left, h, w = self.geometry.crop_box(height, width)
        x = (x[:, :, top:top + h, left:left + w] - self.mean) / self.std
        g = self.geometry
        if g.tile is None:
            return self.outputs(*line.frames.score_as(g, self.model.raw_maps(x)))
        frame_maps, best_tile = line.frames.stitch_tiles(x, g.tile, g.tile_overlap, self.model.raw_maps,
                                                         batch_size=None)
        return self.outputs(*line.frames.score_tiled(frame_maps, best_tile, g.image_score))


def export_onnx(model, path, opts=evaluate.Options(), images=None, cls=None, log=print, input_kind="frames",
                frame_size=None):
    """Write the scoring path as ONNX and check it before it takes its name. input_kind "frames" (FrameGraph,
    input "frames": uint8 (B, H, W, 3), B, H and W dynamic unless frame_size fixes H and W) or "normalised"
    (NormalisedGraph, input "image"). Outputs "anomaly_map" (B, 256, 256), "score" (B,) and with a calibration
    "normalised_score" and "decision" (bool, true for anomalous) under the threshold of `cls`, else the pooled
    one. The check: onnxruntime against PyTorch on 3 inputs at batch 1 and 3 (the first from `images`, topped up
    with seeded random ones), within 1e-4 of each output's maximum; for frames also, on `images`, the graph's
    scores and decisions against the Python path (data.load_image, as predict.py --images scores)."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter's back end)
    except ImportError:
        raise ValueError("--export needs the optional packages onnx, onnxscript and onnxruntime: "
                         "pip install onnx onnxscript onnxruntime") from None
    if Path(path).exists():
        raise ValueError(f"{path}: exists; not replacing it")
    geometry = opts.geometry or data.geometry_of(model.config.geometry)
    cal = opts.pictures.calibration
    files = image_files(images) if images else []
    # The graph is fp32 whatever --precision says: a model cast to bf16 first would lose its weights' precision.
    fp32 = evaluate.ready_model(model, "cpu", "fp32")
    if input_kind == "normalised":
        if geometry.tile is not None:
            raise ValueError("--export-input normalised takes one model input, and tiles are many: export frames")
        graph, name = NormalisedGraph(fp32, geometry, cal, cls), "image"
        h, w = geometry.input_size()
        x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
        for i, f in enumerate(files[:3]):  # the given images first
            x[i] = data.load_image(f, geometry)
        dynamic = {0: torch.export.Dim("batch", min=1)}
    else:
        if geometry.bit_depth is not None:
            raise ValueError(f"--export takes 8-bit RGB frames, and {geometry.describe()} reads wider ones: "
                             "--export-input normalised")
        if geometry.image_size is None and frame_size is None:
            raise ValueError("--export: tiles at each frame's own size make a graph per frame size: pass "
                             "--frame-size HxW, the size of the camera's frames")
        fixed = geometry.frame_size(*frame_size) if frame_size else None
        graph, name = FrameGraph(fp32, geometry, cal, cls, fixed), "frames"
        h, w = frame_size or geometry.image_size  # the size of the inputs the export traces and checks
        x = torch.randint(0, 256, (3, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for i, f in enumerate(files[:3]):
            x[i] = torch.from_numpy(raw_frame(f, (h, w)).copy())
        dynamic = {0: torch.export.Dim("batch", min=1)}
        if frame_size is None:
            dynamic.update({1: torch.export.Dim("height", min=14), 2: torch.export.Dim("width", min=14)})
    names = ["anomaly_map", "score"] + (["normalised_score", "decision"] if cal else [])
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with inpformer.atomic_write(path) as tmp:  # checked before it is named `path`
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, (x[:2],), tmp, dynamo=True, external_data=False, input_names=[name],
                                  output_names=names, dynamic_shapes=(dynamic,))
            session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        except Exception as e:  # the exporter's and onnxruntime's own errors, as one line
            raise ValueError(f"{path}: the export failed ({inpformer.first_line(e)})") from e
        for b in (1, 3):
            t0 = time.perf_counter()
            with torch.no_grad():
                want = graph(x[:b])
            t1 = time.perf_counter()
            got = [torch.from_numpy(a) for a in session.run(None, {name: x[:b].numpy()})]
            t2 = time.perf_counter()
            diffs = [float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got[:3], want[:3])]
            if cal:  # decisions: equal, except for a score within round-off of the threshold
                near = (want[1] - graph.outputs.threshold).abs() <= 1e-4 * want[1].abs().max()
                diffs.append(float(((got[3] != want[3]) & ~near).any()))
            shown = ", ".join(f"{n} {d:.2e}" for n, d in zip(names, diffs))
            log(f"  batch {b}: max |onnx - torch| / max |torch|: {shown}; {1e3 * (t2 - t1) / b:.0f} ms/image "
                f"onnxruntime, {1e3 * (t1 - t0) / b:.0f} ms/image torch")
            if max(diffs) > 1e-4:
                raise ValueError(f"{path}: the ONNX outputs differ from PyTorch's by {max(diffs):.2e} of their maximum")
        if input_kind == "frames" and files:
            compare_with_python(session, fp32, geometry, cal, cls, files, frame_size, log)
        size = Path(tmp).stat().st_size
    shape = f"uint8 ({'B, ' + str(frame_size[0]) + ', ' + str(frame_size[1]) if frame_size else 'B, H, W'}, 3)"
    log(f"wrote {path} ({size / 2**20:.1f} MiB): input {name} {shape if name == 'frames' else '(B, 3, h, w)'}, "
        f"{geometry.describe()}, outputs {', '.join(names)}" + ("" if cal else " (no calibration, so no decision)"))
    return Path(path)


def raw_frame(path, size=None) -> np.ndarray:
    """An image file as a camera frame: uint8 (H, W, 3) RGB, resized to `size` (height, width) when given. 16-bit
    and float images are refused: an 8-bit frame would clip them."""
    with Image.open(path) as im:
        if im.mode in data.WIDE_GREY:
            raise ValueError(f"{path}: a {im.mode} image is no 8-bit frame: export with --export-input normalised")
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im)


def compare_with_python(session, model, geometry, calibration, cls, files, frame_size, log):
    """The exported graph on raw frames against the Python path on the same files: the scores' largest relative
    difference and the share of decisions that agree, logged. The Python path resizes with PIL in 8 bits, the
    graph in float32: the scores differ a little, never by the graph's arithmetic."""
    worst, agree = 0.0, 0
    for f in files:
        frame = raw_frame(f, frame_size)
        got = session.run(None, {"frames": frame[None]})
        # the file as predict.py --images reads it; a frame resized to --frame-size, as the graph gets it
        x = data.load_image(Image.fromarray(frame) if frame_size else f, geometry)
        want = float(line.frames.predict_frames(model, x[None] if geometry.tile is None else [x], geometry)[1][0])
        worst = max(worst, abs(float(got[1][0]) - want) / max(abs(want), 1e-12))
        if calibration:
            agree += bool(got[3][0]) == (want >= line.decisions.class_threshold(calibration, cls))
    log(f"  on {len(files)} images, the graph's scores against the Python path's: at most {100 * worst:.2f} % apart"
        + (f"; decisions agree on {agree} of {len(files)}" if calibration else ""))


# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = train.script_parser(__doc__)
    p.add_argument("--ckpt", required=True,
                   help="project checkpoint (.safetensors), official state dict (model.pth or .safetensors), or "
                        "the folder of a run (--calibrate: each model of a single-class run on its own class)")
    what = p.add_argument_group("what to do (one of)")
    what.add_argument("--calibrate", action="store_true",
                      help="learn the decision rule and store it in the checkpoint, its tensors untouched, replacing "
                           "any earlier one (with --classes, on a calibrated model: those classes' thresholds only, "
                           "each learnt on its own images): on a labelled set (--data/--data-root, default the "
                           "checkpoint's test set), or on good images alone (--images)")
    what.add_argument("--images", nargs="+", metavar="PATH",
                      help="score these images or folders: predictions.csv, regions.csv, heatmaps/*.png (with "
                           "--calibrate: these are good parts to calibrate on)")
    what.add_argument("--export", type=Path, metavar="OUT.onnx",
                      help="write the scoring path as ONNX and check it with onnxruntime (on the --images given, "
                           "else on random inputs)")
    cal = p.add_argument_group("--calibrate")
    cal.add_argument("--max-false-reject", type=train.number(float, 0.0), metavar="P",
                     help="set the image thresholds from the good images alone so that a new good part is rejected "
                          "with probability at most P (the conformal rule; e.g. 0.01)")
    cal.add_argument("--max-false-pixels", type=train.number(float, 0.0), metavar="Q",
                     help=f"with --max-false-reject: the region threshold flags at most this share of the good "
                          f"images' pixels, below 1 (default {MAX_FALSE_PIXELS:g})")
    export = p.add_argument_group("--export")
    export.add_argument("--export-input", choices=["frames", "normalised"], default="frames",
                        help="frames (default): raw uint8 (B, H, W, 3) camera frames in, the resize, crop and "
                             "normalisation inside the graph; normalised: the preprocessed float batch, as before")
    export.add_argument("--frame-size", type=train.size("none"), metavar="HxW",
                        help="fix the frames' size in the graph (needed for tiles at each frame's own size)")
    line = p.add_argument_group("--images")
    line.add_argument("--min-area", type=train.number(), metavar="N",
                      help="regions smaller than N pixels (of the image's own size) are ignored (default 1)")
    line.add_argument("--decide-by", choices=["score", "regions"], default="score",
                      help="score (default): anomalous at or above the image threshold; regions: anomalous when any "
                           "region of at least --min-area pixels is over the pixel threshold")
    line.add_argument("--save-masks", action="store_true",
                      help="write masks/<name>.png: each image's regions as a 0/255 mask of its own size")
    train.add_data_args(p, data.DATASETS, defaults={
        "batch-size": str(evaluate.Options.batch_size),
        "classes help": "--calibrate: the classes to calibrate, a comma list; on a calibrated model each is learnt on "
                        "its own images and every other class's thresholds and the pooled ones are kept (default, "
                        "or all: the checkpoint's classes, the whole rule replaced; with --images: the class of "
                        "those good images); --images: the one class whose thresholds to use (default: the pooled "
                        "ones)"})
    p.add_argument("--out", type=Path, help="output folder of --images (default: <checkpoint folder>/predictions)")
    p.add_argument("--zero-shot", action="store_true",
                   help="--images: anomaly map = INP distance (scores only: calibrations are for reconstruction maps)")
    train.add_picture_args(p)
    args = p.parse_args(argv)
    train.check_picture_args(args)
    if not (args.calibrate or args.images or args.export):
        raise ValueError("give --calibrate, --images PATH or --export OUT.onnx (see --help)")
    if args.calibrate and args.export:
        raise ValueError("--calibrate learns a decision rule and --export writes a graph: run them one at a time")
    if args.calibrate and args.zero_shot:
        raise ValueError("--calibrate learns the decision rule of the reconstruction maps; drop --zero-shot")
    if args.export and args.zero_shot:
        raise ValueError("--export writes the reconstruction maps; drop --zero-shot")
    if args.max_false_reject is not None and not (args.calibrate and args.max_false_reject < 1):
        raise ValueError(f"--max-false-reject {args.max_false_reject}: a budget below 1, with --calibrate")
    if args.max_false_pixels is not None and not (args.max_false_reject is not None and args.max_false_pixels < 1):
        raise ValueError(f"--max-false-pixels {args.max_false_pixels}: a share below 1, with --max-false-reject")
    if args.calibrate and args.images and args.max_false_reject is None:
        raise ValueError("--calibrate on --images (good parts only) needs --max-false-reject P")
    region_flags = [f for f, given in (("--decide-by regions", args.decide_by == "regions"),
                                       ("--min-area", args.min_area is not None), ("--save-masks", args.save_masks))
                    if given]
    if region_flags and (not args.images or args.export or args.calibrate):
        raise ValueError(f"{', '.join(region_flags)}: for the regions of --images (the export decides by score)")
    if args.frame_size is not None and not (args.export and args.export_input == "frames"):
        raise ValueError("--frame-size fixes the frames of --export (its default input, frames)")
    args.max_false_pixels = MAX_FALSE_PIXELS if args.max_false_pixels is None else args.max_false_pixels
    args.min_area = 1 if args.min_area is None else args.min_area
    return args


def main(argv=None, log=train.log_line):
    args = parse_args(argv)
    device, precision = train.device_and_precision(args)
    ckpts = evaluate.checkpoint_files(args.ckpt)
    if (args.images or args.export) and len(ckpts) > 1:
        raise ValueError(f"{args.ckpt}: --images and --export need one model file, not a folder of {len(ckpts)}")
    if args.calibrate:
        return calibrate_main(args, ckpts, device, precision, log)

    model = evaluate.load_ready(ckpts[0], device, precision)
    meta = inpformer.read_checkpoint_metadata(ckpts[0])
    cal = None if args.zero_shot else line.decisions.read_calibration(meta, ckpts[0], log)
    # The calibration's geometry is the one its thresholds hold at: prediction starts from it.
    calibrated_at = calibration_geometry(cal)
    geometry = evaluate.asked_geometry(model, args, ckpts[0], log, base=calibrated_at)
    if calibrated_at is not None and calibrated_at != geometry:
        log(f"note: {ckpts[0]} was calibrated at {calibrated_at.describe()}, not {geometry.describe()}: its "
            "thresholds may not hold")
    if args.outline and not cal:
        log(f"note: --outline draws the calibrated pixel threshold, and {ckpts[0]} has no calibration")
    opts = evaluate.Options(batch_size=args.batch_size or evaluate.Options.batch_size, device=str(device),
                           precision=precision, workers=train.workers(args.workers), geometry=geometry,
                           zero_shot=args.zero_shot,
                           pictures=line.pictures.PictureStyle(cal, args.outline, args.heat_range))
    calibrated = (cal or {}).get("class_names", list((cal or {}).get("classes", {})))
    if args.classes and ("," in args.classes or (cal and args.classes not in calibrated)):
        known = f" (calibrated: {', '.join(calibrated)})" if cal else ""
        raise ValueError(f"--classes {args.classes}: one class whose threshold to use{known}")
    if args.export:
        frame_size = None if args.frame_size in (None, "none") else args.frame_size
        export_onnx(model, args.export, opts, args.images, args.classes, log, args.export_input, frame_size)
        return 0

    if args.decide_by == "regions" and not cal:
        why = "--zero-shot maps have none" if args.zero_shot else f"{ckpts[0]} has none"
        raise ValueError(f"--decide-by regions needs the pixel threshold of a calibration, and {why}")
    if (args.min_area > 1 or args.save_masks) and not cal:
        log("note: regions need a calibration's pixel threshold: without one, --min-area and --save-masks do nothing")
    files = image_files(args.images)
    out = args.out or ckpts[0].parent / "predictions"
    log(f"{ckpts[0]}: scoring {len(files)} images at {geometry.describe()} on {device}")
    predict_images(model, files, opts, out, args.classes, log, RegionRule(args.min_area, args.decide_by,
                                                                        args.save_masks))
    log(f"wrote {out / 'predictions.csv'}, {out / 'regions.csv'} and {out / 'heatmaps'}/")
    return 0


@dataclass
class CalibrationPlan:
    """One model file to calibrate, checked before anything is scored."""
    ckpt: Path
    meta: dict            # what the checkpoint records
    data_set: object      # evaluate.DataSet, or None when calibrating on good images (--images)
    samples: dict         # {class: [data.Sample]}
    earlier: dict = None  # the calibration kept but for the classes of `samples` (--classes), or None


def calibrate_main(args, ckpts, device, precision, log):
    """--calibrate: each model file on its data set (a single-class run folder: each model on its own class), or
    one model on good images (--images). With --classes, a model that has a calibration keeps it but for those
    classes, each calibrated on its own images (with_classes)."""
    if args.images and len(ckpts) > 1:
        raise ValueError(f"{args.ckpt}: --calibrate --images calibrates one model file, not a folder of {len(ckpts)}")
    if args.images and args.classes and "," in args.classes:
        raise ValueError(f"--classes {args.classes}: --calibrate --images takes the one class of those images")
    files = image_files(args.images) if args.images else None
    plans = []
    for ckpt in ckpts:  # everything checked before anything is scored
        meta = inpformer.read_checkpoint_metadata(ckpt)
        data_set = None
        if files is None:
            classes = args.classes
            if classes is None and len(ckpts) > 1:  # a single-class run: each model on its own class
                classes = ",".join(data.split_list(meta.get("classes")))
            sets = evaluate.plan_data_sets(meta, ckpt, args.data, args.data_root, classes)
            if len(sets) > 1:
                raise ValueError("--calibrate learns one rule per model: calibrate it on one data set")
            data_set = sets[0]
            samples = calibration_samples(data_set)
        else:
            samples = good_samples(files, args.classes)
        calibration_target(ckpt)
        earlier = None
        if args.classes not in (None, "all"):  # some classes: the others are kept, when there is a rule
            earlier = line.decisions.read_calibration(meta, ckpt, log)
        if earlier:
            check_each_class(ckpt, earlier, samples, args)
        elif args.max_false_reject is not None:  # a budget the good images cannot support fails now
            check_budget(sum(s.label == 0 for found in samples.values() for s in found), args.max_false_reject)
        plans.append(CalibrationPlan(ckpt, meta, data_set, samples, earlier))
    for plan in plans:
        model = evaluate.load_ready(plan.ckpt, device, precision)
        # the geometry the thresholds kept hold at, as prediction starts from it
        base = calibration_geometry(plan.earlier) if plan.earlier else None
        geometry = evaluate.asked_geometry(model, args, plan.ckpt, log, base=base)
        opts = evaluate.Options(batch_size=args.batch_size or evaluate.Options.batch_size, device=str(device),
                               precision=precision, workers=train.workers(args.workers), geometry=geometry)
        test_sets = {c: data.ImageDataset(found, geometry) for c, found in plan.samples.items()}
        if files is not None:
            log(f"{plan.ckpt}: calibrating on {len(files)} good images")
        else:
            log(f"{plan.ckpt}: calibrating on {plan.data_set.data} in {plan.data_set.root}")
        files_used = {str(Path(s.image).resolve()) for ds in test_sets.values() for s in ds.samples}
        seen = training_images(plan.meta) & files_used
        if seen:
            log(f"warning: {len(seen)} of the calibration images are training images of {plan.ckpt}: their scores are "
                "optimistic, so thresholds learnt on them reject more new good parts than asked")
        budget = (args.max_false_reject, args.max_false_pixels)
        if plan.earlier:
            learnt = {c: calibrate_on(model, {c: ds}, opts, *budget, log) for c, ds in test_sets.items()}
            rule = with_classes(plan.earlier, learnt)
        else:
            if args.classes and plan.meta.get("calibration") is None:
                log(f"note: {plan.ckpt} has no calibration to keep: the whole rule, the pooled thresholds too, is "
                    f"learnt on {', '.join(test_sets)}")
            rule = calibrate_on(model, test_sets, opts, *budget, log)
        target = write_calibration(plan.ckpt, rule, plan.data_set)
        if plan.earlier:
            log(partial_summary(target, rule, list(test_sets)))
        else:
            log(calibration_summary(target, rule, replaced=plan.meta.get("calibration") is not None))
    return 0


def check_each_class(ckpt, earlier, samples, args):
    """Before --calibrate --classes scores anything: the thresholds of one rule hold at one geometry, so the sizes
    asked must be the calibration's; and each class, calibrated on its own images, needs good ones (enough for
    the budget)."""
    at = calibration_geometry(earlier)
    if at is not None:
        asked = train.geometry(args, at)
        if asked != at:
            raise ValueError(f"{ckpt}: calibrated at {at.describe()}, and --classes would add thresholds at "
                             f"{asked.describe()}: calibrate every class again (drop --classes), or at its geometry")
    for c, found in samples.items():
        good = sum(s.label == 0 for s in found)
        if not good:
            raise ValueError(f"--classes {args.classes}: class {c} has no good image to calibrate it on its own")
        if args.max_false_reject is not None:
            check_budget(good, args.max_false_reject)


def calibration_summary(target, rule, replaced=False) -> str:
    per_class = ", ".join(f"{c} {t:.4g}" for c, t in rule["classes"].items())
    line = f"calibrated {target}" + (" (its earlier calibration replaced, as --calibrate asked)" if replaced else "")
    line += f": image threshold {rule['image_threshold']:.4g} ({rule['rule']['image']})"
    line += f", per class {per_class}" if per_class else ""
    line += f"; pixel threshold {rule['pixel_threshold']:.4g} ({rule['rule']['pixel']})"
    if "miss_rate" in rule:
        line += f"; labelled defects missed: {100 * rule['miss_rate']['pooled']:.1f} % at the pooled threshold"
        line += "".join(f", {c} {100 * m:.1f} %" for c, m in rule["miss_rate"]["classes"].items())
    return line


def partial_summary(target, rule, replaced) -> str:
    """What --calibrate --classes replaced and what it kept, in one line."""
    parts = []
    for c in replaced:
        own, record = line.decisions.class_rule(rule, c), rule["class_rules"][c]
        text = (f"{c} image threshold {own['image_threshold']:.4g} ({record['rule']['image']}, {record['images']} "
                f"images), pixel threshold {own['pixel_threshold']:.4g}")
        if "miss_rate" in record:
            text += f", labelled defects missed {100 * record['miss_rate']:.1f} %"
        parts.append(text)
    kept = [f"{c} {t:.4g}" for c, t in rule["classes"].items() if c not in replaced]
    pooled = [c for c in rule["class_names"] if c not in rule["classes"]]
    kept.append(f"the pooled image threshold {rule['image_threshold']:.4g} and pixel threshold "
                f"{rule['pixel_threshold']:.4g}" + (f" (used by {', '.join(pooled)})" if pooled else ""))
    return f"calibrated {target}: replaced {'; '.join(parts)}; kept {', '.join(kept)}"


if __name__ == "__main__":
    train.guard(main)
