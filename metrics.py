"""Exact anomaly-detection metrics on a CPU: image and pixel AUROC, AP and F1-max, and AUPRO.

The seven numbers anomaly-detection papers report per class, computed exactly (every distinct score is a
threshold, no binning, no epsilon), from numpy arrays or torch tensors. numpy and torch only, so this file can
be copied into another project on its own. (The official code reports its pixel metrics through the ADEval
package, binned; the project's line/adeval.py reproduces those.)

    from metrics import compute_all
    results = compute_all(image_labels, image_scores, masks, maps)   # masks, maps: (N, H, W)
    # {"I-AUROC": .., "I-AP": .., "I-F1max": .., "P-AUROC": .., "P-AP": .., "P-F1max": .., "AUPRO": ..}

Definitions (scikit-learn's for AUROC, AP and F1-max; the MVTec AD evaluation code's for AUPRO):
- A sample is predicted anomalous when its score is >= the threshold, so tied scores switch together and
  every curve has one point per distinct score.
- AUROC: trapezoid over the ROC points, = P(s+ > s-) + P(s+ = s-) / 2.
- AP: step-wise sum over the thresholds of (recall increase) x precision; not a trapezoid.
- F1-max: the largest 2PR / (P + R) over the thresholds, 0 where P + R = 0. Its threshold (`f1_threshold`)
  is the highest score t at which "anomalous when score >= t" reaches F1-max.
- AUPRO: regions are the 8-connected components of each image's mask (never across images). PRO(t) is the
  mean over all regions of the set of the fraction of the region scoring >= t; FPR(t) pools the normal
  pixels of all images. The (FPR, PRO) curve from (0, 0) is integrated with the trapezoid rule up to exactly
  FPR = fpr_limit (the crossing segment is cut by linear interpolation) and divided by fpr_limit.
- A metric without the samples it needs (no anomalous sample, no normal sample, no region) is NaN, with an
  UndefinedMetricWarning.

Inputs: scores are used at their exact values (float16 is widened to float32, which is exact); NaN scores
raise ValueError. Masks and labels: bool or integer, nonzero = anomalous (so 0/255 PNG masks work); float
masks must hold only 0 and 1, because a resized soft mask needs a threshold that only the caller can choose.
Counts are int64 and sums float64, so results agree with exact rational arithmetic far inside 1e-9.

The file reads in that order: `reference_metrics`, the definitions above computed plainly with one sort and
a flood fill, a screen long; then the fast machinery the public functions use (bucketed counting instead of
a full sort of 10^8 pixels, run-based region labelling), tested equal to the reference. For pixel sets too
large to keep in memory (Real-IAD), `PixelHistogram` accumulates fixed-width score histograms batch by batch;
it states its resolution and bounds its own error.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["auroc", "average_precision", "f1_max", "f1_threshold", "aupro", "label_components", "compute_all",
           "PixelHistogram", "UndefinedMetricWarning", "reference_metrics", "reference_pixel_regions", "FPR_LIMIT"]


FPR_LIMIT = 0.3  # AUPRO integrates the PRO curve up to this false-positive rate (MVTec AD's protocol)


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined on the given data (for example no anomalous sample); NaN was returned."""


def _undefined(name, why):
    warnings.warn(f"{name} is undefined: {why}; returning NaN", UndefinedMetricWarning, stacklevel=4)
    return float("nan")

# -----------------------------------------------------------------------------------------------------
# Inputs


def _numpy(x):
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 exactly
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _binary(x, name):
    """Masks or labels as bool: nonzero is anomalous; float input must already be 0/1."""
    a = _numpy(x)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind in "iu":
        return a != 0
    if a.dtype.kind == "f":
        if not np.all((a == 0) | (a == 1)):
            raise ValueError(f"{name}: float values other than 0 and 1; binarise them first (e.g. > 0.5)")
        return a == 1
    raise TypeError(f"{name}: expected bool, integer or 0/1 float values, got {a.dtype}")


def _scores(x, name):
    a = _numpy(x)
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected real scores, got {a.dtype}")
    return a


def _key_dtype(dtype):
    # Scores are compared in this dtype. float16 is widened because numpy sorts it slowly; the widening is
    # exact, as is keeping every other dtype as it is.
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _check_no_nan(a, name):
    if a.dtype.kind == "f" and np.isnan(a).any():
        raise ValueError(f"{name} contain NaN")


def _volume(masks, maps):
    """(N, H, W) bool masks and scores; 2-D input is one image, leading axes beyond 3-D are flattened."""
    m, s = _binary(masks, "masks"), _scores(maps, "maps")
    if m.shape != s.shape:
        raise ValueError(f"masks {m.shape} and maps {s.shape} differ in shape")
    if m.ndim < 2:
        raise ValueError(f"masks and maps need (N, H, W) or (H, W), got {m.shape}")
    return m.reshape(-1, *m.shape[-2:]), s.reshape(-1, *s.shape[-2:])

# -----------------------------------------------------------------------------------------------------
# The reference: the definitions above, computed plainly with one sort. Everything after this section computes
# the same numbers faster and in less memory (bucketed counting, run-based region labelling); the tests hold
# it to this reference on every fixture case and on random ties.


def reference_curve(positive, scores, weights):
    """At every distinct score t, highest first: t, and over the samples scoring >= t the number of positives,
    of negatives, and the sum of the positives' weights."""
    order = np.argsort(-scores, kind="stable")
    s, pos, w = scores[order], positive[order], weights[order]
    last_of_tie = np.append(s[1:] != s[:-1], True)  # ties switch together: one point after each run
    return s[last_of_tie], np.cumsum(pos)[last_of_tie], np.cumsum(~pos)[last_of_tie], np.cumsum(w)[last_of_tie]


def reference_regions(mask):
    """8-connected components of one (H, W) bool mask by flood fill: (labels 0..n, n)."""
    labels, n = np.zeros(mask.shape, np.int64), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start], stack = n, [start]
        while stack:
            y, x = stack.pop()
            for ny in range(max(y - 1, 0), min(y + 2, mask.shape[0])):
                for nx in range(max(x - 1, 0), min(x + 2, mask.shape[1])):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = n
                        stack.append((ny, nx))
    return labels, n


def reference_metrics(labels, scores, fpr_limit=None, regions=None):
    """AUROC, AP, F1-max and its threshold of (labels, scores), all samples as one set; and with fpr_limit and
    `regions` (region ids per sample, 0 for normal samples, as from reference_regions) the AUPRO. NaN where a
    metric is undefined (no warning: the fast functions warn)."""
    y, s = _binary(labels, "labels").reshape(-1), _scores(scores, "scores").reshape(-1).astype(np.float64)
    n_pos, n_neg, nan = int(y.sum()), int((~y).sum()), float("nan")
    weights = np.zeros(s.size)
    if regions is not None:
        r = np.asarray(regions).reshape(-1)
        sizes = np.bincount(r)
        weights[r > 0] = 1.0 / sizes[r[r > 0]]  # each region weighs 1, shared by its pixels
    t, tp, fp, mass = reference_curve(y, s, weights)
    out = dict(auroc=nan, ap=nan, f1=nan, threshold=nan, aupro=nan)
    if n_pos and n_neg:
        tpr, fpr = np.append(0.0, tp / n_pos), np.append(0.0, fp / n_neg)
        out["auroc"] = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoid
    if n_pos:
        precision, recall = tp / (tp + fp), tp / n_pos
        out["ap"] = float(np.sum((recall - np.append(0.0, recall[:-1])) * precision))  # step-wise
        f1 = 2 * tp / (n_pos + tp + fp)  # = 2PR / (P + R), and 0 where tp = 0 (P + R = 0)
        out["f1"], out["threshold"] = float(f1.max()), float(t[np.argmax(f1)])  # the first maximum: the highest t
    n_regions = 0 if regions is None else int(np.count_nonzero(np.bincount(r)[1:]))
    if fpr_limit is not None and n_regions and n_neg:
        fpr, pro = np.append(0.0, fp / n_neg), np.append(0.0, np.minimum(mass / n_regions, 1.0))
        inside = fpr <= fpr_limit  # a prefix: fpr never decreases
        x, z = fpr[inside], pro[inside]
        if x[-1] < fpr_limit:  # cut the segment that crosses the limit
            i = int(inside.sum())
            cut = pro[i - 1] + (pro[i] - pro[i - 1]) * (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
            x, z = np.append(x, fpr_limit), np.append(z, cut)
        out["aupro"] = float(np.sum((x[1:] - x[:-1]) * (z[1:] + z[:-1]) / 2) / fpr_limit)
    return out


def reference_pixel_regions(masks):
    """Region ids of an (N, H, W) mask stack, numbered across the stack, regions never crossing images."""
    m = _binary(masks, "masks")
    out, offset = np.zeros(m.shape, np.int64), 0
    for i in range(m.shape[0]):
        labels, n = reference_regions(m[i])
        out[i] = np.where(labels > 0, labels + offset, 0)
        offset += n
    return out


# -----------------------------------------------------------------------------------------------------
# Connected components: 8-connected, per image, on horizontal runs of anomalous pixels
#
# Working on runs instead of pixels keeps the graph small (masks are mostly empty, blobs are wide), and
# the whole stack of images is labelled at once with array operations instead of a per-pixel loop.

def _expand(first, count):
    """Concatenated ranges [first[i], first[i] + count[i])."""
    offsets = np.cumsum(count) - count
    return np.repeat(first - offsets, count) + np.arange(int(count.sum()))


def _runs(mask):
    """Runs of anomalous pixels in raster order: (row, start, stop), rows numbered across all images."""
    n_img, height, width = mask.shape
    rows = mask.reshape(n_img * height, width)
    active = np.flatnonzero(rows.any(axis=1))
    padded = np.zeros((active.size, width + 2), np.int8)
    padded[:, 1:-1] = rows[active]
    step = np.diff(padded, axis=1)  # +1 at the first pixel of a run, -1 just past its last
    r, start = np.nonzero(step > 0)
    _, stop = np.nonzero(step < 0)  # nonzero is row-major, so the i-th stop closes the i-th start
    return active[r], start, stop


def _union(n, a, b):
    """Components of the graph on n nodes with edges (a, b); ids numbered in order of each smallest node."""
    parent = np.arange(n)
    while a.size:
        ra, rb = parent[a], parent[b]  # parent is flat here, so these are roots
        apart = ra != rb
        if not apart.any():
            break
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]  # joined edges stay joined: drop them
        # Hook the larger root under the smaller: parent[i] <= i always holds, so no cycle can form.
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # pointer jumping until every node points straight at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    roots, comp = np.unique(parent, return_inverse=True)
    return comp, roots.size


@dataclass
class Runs:
    """The runs of a mask's rows (row r of image i is row i * H + r; a run covers columns start..stop-1) and the
    8-connected region of each, numbered 0..n-1 in raster order of each region's first pixel."""
    row: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    region: np.ndarray
    n: int

    def pixels(self, width):
        """(flat index of every pixel of the runs in raster order, the length of each run)."""
        length = self.stop - self.start
        return _expand(self.row * width + self.start, length), length


def label_runs(mask) -> Runs:
    """The runs of an (N, H, W) bool mask and their 8-connected regions, regions never crossing images."""
    _, height, width = mask.shape
    row, start, stop = _runs(mask)
    # A run touches the runs of the next row that overlap it once widened by one pixel on each side (the
    # diagonal neighbours). With keys row * (W + 2) + column the runs are sorted by both start and stop key,
    # so the runs touching run i form one block [first[i], last[i]) found by binary search.
    stride = width + 2
    below = (row + 1) * stride
    first = np.searchsorted(row * stride + stop, below + start, side="left")
    last = np.searchsorted(row * stride + start, below + stop, side="right")
    last[row % height == height - 1] = 0  # the bottom row of an image touches nothing in the next image
    count = np.maximum(last - first, 0)
    a = np.repeat(np.arange(row.size), count)
    b = _expand(first, count)
    region, n = _union(row.size, a, b)
    return Runs(row, start, stop, region, n)


def label_components(mask2d):
    """8-connected components of one (H, W) mask (pixels touching at a corner are connected).

    Returns (labels, n): int32 labels, 0 for background and 1..n numbered in raster order of each region's
    first pixel (as scipy.ndimage.label numbers them), and the number of regions.
    """
    m = _binary(mask2d, "mask")
    if m.ndim != 2:
        raise ValueError(f"label_components takes one (H, W) mask, got shape {m.shape}")
    height, width = m.shape
    runs = label_runs(m[None])
    labels = np.zeros((height, width), np.int32)
    pixels, length = runs.pixels(width)
    labels.reshape(-1)[pixels] = np.repeat(runs.region + 1, length)
    return labels, runs.n


def _region_pixels(mask):
    """Flat indices of the anomalous pixels (raster order), the weight 1/|region| of each, and #regions."""
    _, _, width = mask.shape
    runs = label_runs(mask)
    pixels, length = runs.pixels(width)
    size = np.bincount(runs.region, weights=length, minlength=runs.n)
    return pixels, np.repeat(1.0 / size[runs.region], length), runs.n

# -----------------------------------------------------------------------------------------------------
# Curves
#
# Every metric here is a function of the counts at each threshold, highest threshold first. Only thresholds
# where an anomalous sample switches on matter: between two of them the ROC and PRO curves run flat (only
# FPR grows), which adds area but no corner, and precision and F1 only fall. So a curve is stored as, for
# each distinct anomalous score t_k (descending): tp_k = #anomalous >= t_k, fp_ge_k = #normal >= t_k,
# fp_gt_k = #normal > t_k and pro_k = PRO(t_k). The normal pixels tied at t_k are the diagonal segment from
# (fp_gt_k, pro_{k-1}) to (fp_ge_k, pro_k).


class _Curve:
    def __init__(self, tp, fp_gt, fp_ge, n_pos, n_neg, pro=None, n_regions=0, thresholds=None):
        self.tp, self.fp_gt, self.fp_ge, self.thresholds = tp, fp_gt, fp_ge, thresholds
        self.n_pos, self.n_neg = int(n_pos), int(n_neg)
        self.pro, self.n_regions = pro, int(n_regions)

    def _gained(self):
        return np.diff(self.tp, prepend=0)  # anomalous samples switching on at each threshold

    def auroc(self, name="AUROC"):
        if self.n_pos == 0 or self.n_neg == 0:
            return _undefined(name, f"needs both classes, got {self.n_pos} anomalous and {self.n_neg} normal")
        # Mann-Whitney form of the tie-grouped trapezoid: each anomalous sample scores 1 per normal sample
        # below it and 1/2 per tied one. Products are exact in float64 up to 2^53.
        twice = 2.0 * (self.n_neg - self.fp_ge) + (self.fp_ge - self.fp_gt)
        return float(np.dot(self._gained().astype(np.float64), twice) / (2.0 * self.n_pos * self.n_neg))

    def average_precision(self, name="AP"):
        if self.n_pos == 0:
            return _undefined(name, "no anomalous sample")
        gained = self._gained()
        on = gained > 0
        precision = self.tp[on] / (self.tp[on] + self.fp_ge[on])
        return float(np.dot(gained[on].astype(np.float64), precision) / self.n_pos)

    def f1_max(self, name="F1-max"):
        """(F1-max, the highest threshold reaching it); (NaN, NaN) without an anomalous sample."""
        if self.n_pos == 0:
            return _undefined(name, "no anomalous sample"), float("nan")
        # 2PR / (P + R) with P = tp / (tp + fp), R = tp / n_pos simplifies to 2 tp / (n_pos + tp + fp).
        f1 = 2.0 * self.tp / (self.n_pos + self.tp + self.fp_ge)
        k = int(np.argmax(f1))  # thresholds descend, so the first maximum is at the highest threshold
        return float(f1[k]), float(self.thresholds[k])

    def aupro(self, fpr_limit=FPR_LIMIT, name="AUPRO"):
        fpr_limit = float(fpr_limit)
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if self.n_regions == 0:
            return _undefined(name, "no anomalous region")
        if self.n_neg == 0:
            return _undefined(name, "no normal pixel")
        pro = np.minimum(self.pro, 1.0)  # a float64 sum of 1/|region| can overshoot 1 by an ulp
        k = pro.size
        x, y = np.zeros(2 * k + 2), np.zeros(2 * k + 2)
        x[1:-1:2], y[1:-1:2] = self.fp_gt / self.n_neg, np.concatenate(([0.0], pro[:-1]))
        x[2:-1:2], y[2:-1:2] = self.fp_ge / self.n_neg, pro
        x[-1], y[-1] = 1.0, pro[-1]
        return float(_area_up_to(x, y, fpr_limit) / fpr_limit)


def _area_up_to(x, y, limit):
    """Trapezoid area under the polyline (x, y), x non-decreasing from 0 to >= limit, for x in [0, limit]."""
    i = int(np.searchsorted(x, limit, side="right"))  # x[:i] <= limit < x[i:]
    area = np.sum((x[1:i] - x[:i - 1]) * (y[1:i] + y[:i - 1])) / 2
    if x[i - 1] < limit:  # the segment (i-1, i) crosses the limit: cut it there
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        y_cut = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_cut) / 2
    return area


# Up to this many scores (image scores), one full sort is simplest; above it, bucketing is faster.
_SORT_ALL_MAX = 1 << 16
_MAX_BUCKETS = 1 << 22
_CHUNK = 1 << 22


def _count_at_or_above(values, thresholds):
    """For ascending distinct thresholds t (in the key dtype): (#values >= t, #values > t), exactly.

    Sorting 10^8 pixel scores would take most of the time of the exact pixel metrics, yet only the order of
    each score relative to the thresholds matters. So the scores are spread over buckets by a monotone map
    (a uniform grid from the lowest to the highest threshold, with ~4 buckets per threshold, plus one bucket
    below and one above). A score in a bucket without a threshold is counted by its bucket alone; one in a
    bucket with a single threshold is compared with that threshold; only the few scores that share a bucket
    with several thresholds are sorted. Ties, float16 and quantised maps cost nothing extra this way.
    """
    key = _key_dtype(values.dtype)
    n = values.size
    thresholds = np.asarray(thresholds, key)
    k = thresholds.size
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    calc = np.float32 if key == np.float32 else np.float64
    n_buckets = int(min(_MAX_BUCKETS, max(1024, 4 * k)))
    lo, hi = calc(thresholds[0]), calc(thresholds[-1])
    width = float(hi) - float(lo)
    scale = calc(n_buckets / width if width > 0 else 1.0)
    if n <= _SORT_ALL_MAX or not (np.isfinite(lo) and np.isfinite(hi) and np.isfinite(scale)):
        v = np.sort(values.astype(key, copy=False), kind="quicksort")
        _check_no_nan(v[-1:], "scores")  # NaN sorts last
        return n - np.searchsorted(v, thresholds, "left"), n - np.searchsorted(v, thresholds, "right")

    def bucket(v):
        # Subtraction, multiplication, clipping and truncation are each monotone (non-decreasing) in
        # floating point, so v <= w implies bucket(v) <= bucket(w): a lower bucket holds only lower scores.
        f = np.subtract(v, lo, dtype=calc)
        f *= scale
        if np.isnan(f).any():
            raise ValueError("scores contain NaN")
        np.clip(f, -1, n_buckets, out=f)
        b = f.astype(np.int64)
        b += 1
        return b

    home = bucket(thresholds)
    kind = np.minimum(np.bincount(home, minlength=n_buckets + 2), 2).astype(np.int8)  # 0, 1 or several
    owner = np.zeros(n_buckets + 2, np.int64)
    owner[home] = np.arange(k)  # the threshold of a single-threshold bucket
    counts = np.zeros(n_buckets + 2, np.int64)  # scores per bucket
    own = np.zeros(3 * k, np.int64)  # [3j + c]: scores below (c=0), at (1) or above (2) t_j in its bucket
    crowded = np.empty(n, values.dtype)  # scores in buckets with several thresholds; untouched pages are free
    n_crowded = 0
    flat = values.reshape(-1)
    for i in range(0, n, _CHUNK):
        v = flat[i:i + _CHUNK]
        b = bucket(v)
        counts += np.bincount(b, minlength=n_buckets + 2)
        kb = kind[b]
        one = np.flatnonzero(kb == 1)
        if one.size:
            j, vj = owner[b[one]], v[one]
            t = thresholds[j]
            slot = 3 * j
            slot += vj >= t
            slot += vj > t
            own += np.bincount(slot, minlength=3 * k)
        several = kb == 2
        m = int(np.count_nonzero(several))
        crowded[n_crowded:n_crowded + m] = v[several]
        n_crowded += m
    crowded = crowded[:n_crowded].astype(key, copy=False)
    crowded.sort(kind="quicksort")

    own = own.reshape(k, 3)
    at_gt = own[:, 2].copy()
    at_ge = own[:, 1] + at_gt
    # In a crowded bucket, the scores >= t_j are the crowded scores >= t_j minus those in higher buckets.
    in_crowded = np.where(kind == 2, counts, 0)
    crowded_above = n_crowded - np.cumsum(in_crowded)  # [b]: crowded scores in buckets above b
    c = kind[home] == 2
    at_ge[c] = n_crowded - np.searchsorted(crowded, thresholds[c], "left") - crowded_above[home[c]]
    at_gt[c] = n_crowded - np.searchsorted(crowded, thresholds[c], "right") - crowded_above[home[c]]
    above = n - np.cumsum(counts)  # [b]: scores in buckets above b
    return above[home] + at_ge, above[home] + at_gt


def _exact_curve(pos_scores, all_scores, weights=None, n_regions=0):
    """Curve of every distinct anomalous score; all_scores includes the anomalous ones."""
    key = _key_dtype(all_scores.dtype)
    pos = pos_scores.astype(key, copy=False)
    order = np.argsort(pos, kind="quicksort")[::-1]
    pos = pos[order]
    _check_no_nan(pos[:1], "scores")  # NaN sorts last, so first after reversing
    ends = np.flatnonzero(pos[1:] != pos[:-1])  # last index of each run of tied scores
    ends = np.append(ends, pos.size - 1) if pos.size else ends
    thresholds = pos[ends]
    tp = ends + 1
    ge, gt = _count_at_or_above(all_scores, thresholds[::-1])
    ge, gt = ge[::-1], gt[::-1]
    pro = None
    if weights is not None and n_regions:
        pro = np.cumsum(weights[order])[ends] / n_regions
    tp_before = np.concatenate(([0], tp[:-1]))  # anomalous scores strictly above t_k
    return _Curve(tp, gt - tp_before, ge - tp, pos.size, all_scores.size - pos.size, pro, n_regions, thresholds)


def _image_curve(labels, scores):
    y, s = _binary(labels, "labels").reshape(-1), _scores(scores, "scores").reshape(-1)
    if y.size != s.size:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    return _exact_curve(s[y], s)


def _pixel_curve(masks, maps):
    mask, score = _volume(masks, maps)
    flat = score.reshape(-1)
    where, weights, n_regions = _region_pixels(mask)
    return _exact_curve(flat[where], flat, weights, n_regions)

# -----------------------------------------------------------------------------------------------------
# Public API


def auroc(labels, scores):
    """Area under the ROC curve (scikit-learn's roc_auc_score); NaN unless both classes are present."""
    return _image_curve(labels, scores).auroc()


def average_precision(labels, scores):
    """Step-wise average precision (scikit-learn's average_precision_score); NaN without a positive."""
    return _image_curve(labels, scores).average_precision()


def f1_max(labels, scores):
    """Largest F1 over all thresholds (0 where P + R = 0, no epsilon); NaN without a positive."""
    return _image_curve(labels, scores).f1_max()[0]


def f1_threshold(labels, scores):
    """(F1-max, the highest threshold reaching it): decide "anomalous" where score >= threshold."""
    return _image_curve(labels, scores).f1_max()


def aupro(masks, maps, fpr_limit=FPR_LIMIT):
    """Normalised area under the PRO curve up to FPR = fpr_limit (MVTec AD definition).

    masks: (N, H, W) bool/0-1 ground truth; maps: (N, H, W) anomaly maps. NaN without any anomalous region
    or without any normal pixel.
    """
    return _pixel_curve(masks, maps).aupro(fpr_limit)


def compute_all(image_labels, image_scores, masks, maps, fpr_limit=FPR_LIMIT, thresholds=False):
    """The seven metrics: image AUROC, AP, F1-max from (labels, scores), and pixel AUROC, AP, F1-max and
    AUPRO from (masks, maps), as python floats (NaN where undefined). The pixel scores are ordered once and
    the one curve serves all four pixel metrics. thresholds=True adds the F1-max thresholds "I-threshold"
    and "P-threshold" (see f1_threshold)."""
    image = _image_curve(image_labels, image_scores)
    pixel = _pixel_curve(masks, maps)
    (i_f1, i_t), (p_f1, p_t) = image.f1_max("I-F1max"), pixel.f1_max("P-F1max")
    return {
        "I-AUROC": image.auroc("I-AUROC"),
        "I-AP": image.average_precision("I-AP"),
        "I-F1max": i_f1,
        "P-AUROC": pixel.auroc("P-AUROC"),
        "P-AP": pixel.average_precision("P-AP"),
        "P-F1max": p_f1,
        "AUPRO": pixel.aupro(fpr_limit),
        **({"I-threshold": i_t, "P-threshold": p_t} if thresholds else {}),
    }

# -----------------------------------------------------------------------------------------------------
# Streaming


class PixelHistogram:
    """Pixel AUROC, AP, F1-max and AUPRO from fixed-width score histograms, accumulated batch by batch.

    For data sets whose pixel scores do not fit in memory (Real-IAD has ~10^10 pixels). This is the protocol
    behind INP-Former's reported pixel numbers (ADEval: 200 bins between the observed min and max, with a
    trapezoidal AP); here the bins are fixed in advance, many more, and AP stays step-wise.

    Scores are quantised into `bins` equal bins over [lo, hi): bin b holds lo + b*w <= s < lo + (b+1)*w with
    w = `resolution` = (hi - lo) / bins (up to the rounding of (s - lo) * bins / (hi - lo) in float64).
    Scores below lo are counted in the first bin and scores at or above hi in the last; compute() then warns,
    because those pixels are all tied: choose lo and hi to cover the maps. The defaults, 65536 bins over
    [0, 2] (w ~ 3.1e-5), cover INP-Former's maps: 1 - cosine similarity lies in [0, 2], and the Gaussian
    smoothing keeps it there.

    The results are the exact metrics of the quantised scores (pixels in one bin are tied), so they differ
    from the exact ones only where anomalous and normal pixels share a bin; `error_bounds()` turns the
    histogram into a guaranteed bound on that difference. Regions are labelled per image inside each batch,
    so AUPRO's region weights are exact.

        hist = PixelHistogram()
        for masks, maps in batches:
            hist.update(masks, maps)        # (B, H, W), numpy or torch
        hist.compute()                      # {"P-AUROC", "P-AP", "P-F1max", "AUPRO"}
    """

    def __init__(self, bins=65536, lo=0.0, hi=2.0):
        self.bins, self.lo, self.hi = int(bins), float(lo), float(hi)
        if self.bins < 1 or not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.hi > self.lo):
            raise ValueError(f"need bins >= 1 and finite lo < hi, got bins={bins}, lo={lo}, hi={hi}")
        self.normal = np.zeros(self.bins, np.int64)  # normal pixels per bin
        self.anomalous = np.zeros(self.bins, np.int64)  # anomalous pixels per bin
        self.region_mass = np.zeros(self.bins, np.float64)  # sum of 1/|region| of the anomalous pixels
        self.n_regions = 0
        self.outside = 0  # scores that fell outside [lo, hi) and were clipped into an end bin

    @property
    def resolution(self):
        """Bin width: scores closer than this may be tied."""
        return (self.hi - self.lo) / self.bins

    def bin_index(self, maps):
        """The bin of every score (int64, same shape); scores outside [lo, hi) clip into the end bins."""
        return self._bin(_scores(maps, "maps"))[0]

    def _bin(self, s):
        f = s.astype(np.float64)
        _check_no_nan(f, "maps")
        f -= self.lo
        f *= self.bins / (self.hi - self.lo)
        np.floor(f, out=f)
        outside = int(np.count_nonzero(f < 0) + np.count_nonzero(f >= self.bins))
        np.clip(f, 0, self.bins - 1, out=f)
        return f.astype(np.int64), outside

    def update(self, masks, maps):
        """Add one batch: masks and maps (B, H, W) (or one (H, W) image), numpy arrays or torch tensors."""
        mask, score = _volume(masks, maps)
        where, weights, n_regions = _region_pixels(mask)
        b, outside = self._bin(score.reshape(-1))
        self.outside += outside
        b_anomalous = b[where]
        anomalous = np.bincount(b_anomalous, minlength=self.bins)
        self.normal += np.bincount(b, minlength=self.bins) - anomalous
        self.anomalous += anomalous
        self.region_mass += np.bincount(b_anomalous, weights=weights, minlength=self.bins)
        self.n_regions += n_regions

    def _curve(self):
        # One threshold per bin, highest first; bins without anomalous pixels do no harm.
        gained, normal = self.anomalous[::-1], self.normal[::-1]
        tp, fp_ge = np.cumsum(gained), np.cumsum(normal)
        pro = np.cumsum(self.region_mass[::-1]) / self.n_regions if self.n_regions else None
        lower_edges = self.lo + np.arange(self.bins)[::-1] * self.resolution
        return _Curve(tp, fp_ge - normal, fp_ge, tp[-1], fp_ge[-1], pro, self.n_regions, lower_edges)

    def compute(self, fpr_limit=FPR_LIMIT, thresholds=False):
        """{"P-AUROC", "P-AP", "P-F1max", "AUPRO"} of the quantised scores; NaN where undefined. thresholds=True
        adds "P-threshold", the lower edge of the bin where F1-max is reached (exact up to `resolution`)."""
        if self.outside:
            total = int(self.normal.sum() + self.anomalous.sum())
            warnings.warn(f"{self.outside} of {total} scores fell outside [{self.lo}, {self.hi}) and share "
                          "the end bins, which costs accuracy; pass a wider lo/hi",
                          RuntimeWarning, stacklevel=2)
        c = self._curve()
        f1, t = c.f1_max("P-F1max")
        return {"P-AUROC": c.auroc("P-AUROC"), "P-AP": c.average_precision("P-AP"), "P-F1max": f1,
                "AUPRO": c.aupro(fpr_limit), **({"P-threshold": t} if thresholds else {})}

    def error_bounds(self, fpr_limit=FPR_LIMIT):
        """Largest possible |compute() - exact| per metric, given only this histogram.

        Inside one bin the exact curve can be any monotone path between the two corners the binned curve
        joins with a straight line; each bound takes the worst such path (NaN where the metric is NaN).
        """
        c = self._curve()
        p, n = c.n_pos, c.n_neg
        if p == 0:
            nan = float("nan")
            return {"P-AUROC": nan, "P-AP": nan, "P-F1max": nan, "AUPRO": nan}
        gained = c._gained().astype(np.float64)
        tp, fp_gt, fp_ge = c.tp.astype(np.float64), c.fp_gt.astype(np.float64), c.fp_ge.astype(np.float64)
        tied = fp_ge - fp_gt
        # AUROC: pairs sharing a bin score 1/2 instead of 0 or 1.
        b_auroc = float(np.dot(gained, tied) / (2.0 * p * n)) if n else float("nan")
        # AP: each anomalous pixel of bin k has its precision somewhere between
        # (tp_{k-1} + 1) / (tp_{k-1} + 1 + fp_ge_k) and tp_k / (tp_k + fp_gt_k).
        on = gained > 0
        tp_before = tp - gained
        low = (tp_before[on] + 1) / (tp_before[on] + 1 + fp_ge[on])
        high = tp[on] / (tp[on] + fp_gt[on])
        binned = tp[on] / (tp[on] + fp_ge[on])
        b_ap = float(max(np.dot(gained[on], binned - low), np.dot(gained[on], high - binned)) / p)
        # F1: every binned point lies on the exact curve, and inside bin k F1 is at most f(tp_k, fp_gt_k).
        f1_best = np.max(2.0 * tp / (p + tp + fp_gt))
        b_f1 = float(f1_best - np.max(2.0 * tp / (p + tp + fp_ge)))
        b_aupro = float("nan")
        if c.n_regions and n:
            limit = float(fpr_limit)
            pro = np.minimum(c.pro, 1.0)
            x0, x1 = fp_gt / n, fp_ge / n
            rise = pro - np.concatenate(([0.0], pro[:-1]))
            crossing = np.where(x0 < limit, (limit - x0) * rise, 0.0)  # the bin that straddles the limit
            inside = np.where(x1 <= limit, (x1 - x0) * rise / 2, crossing)
            b_aupro = float(inside.sum() / limit)
        return {"P-AUROC": b_auroc, "P-AP": b_ap, "P-F1max": b_f1, "AUPRO": b_aupro}
