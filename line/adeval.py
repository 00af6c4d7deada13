"""The binned P-AUROC, P-AP and AUPRO that the official INP-Former code reports through ADEval 1.1.0, so that a
run can be compared with a published table (`evaluate.py --metrics adeval`).

The official evaluation (luow23/INP-Former, utils.py, ader_evaluator) takes I-AUROC, I-AP, I-F1max and P-F1max
from scikit-learn, which metrics.compute_all matches, but P-AUROC, P-AP and AUPRO from ADEval's
EvalAccumulatorCuda, which bins the scores. This module recomputes those three from the same arrays, its
rounding and quirks included; it is held to numbers ADEval itself produced (tests/golden/adeval_1.1.0.*).
"""
import numpy as np

import metrics


def adeval_pixel_metrics(masks, maps, bins=200, fpr_limit=metrics.FPR_LIMIT):
    """P-AUROC, P-AP and AUPRO of one class as ADEval 1.1.0 reports them for the official INP-Former code.

    masks, maps: (N, H, W), all the test images of one class at once (the binning depends on the class's own
    score range). Returns {"P-AUROC", "P-AP", "AUPRO"} as python floats. The official call is, per class,
    `EvalAccumulatorCuda(.., maps.min(), maps.max(), skip_pixel_aupro=False, nstrips=200)` fed the float32
    maps and the 0/1 uint8 masks, then summary()'s p_auroc, p_aupr and p_aupro; bins and fpr_limit are its
    nstrips=200 and its fixed 0.3.

    The protocol, with lo and hi the smallest and largest score of the class:
    - Bins: `bins` equal-width bins between lo and hi, plus an overflow bin for the scores >= hi (and an
      underflow bin for scores < lo, empty here). A score s goes to bin int((s - lo) * bins / (hi - lo)),
      evaluated step by step in float32 (float64 for float64 maps) as torch.histc does, a result of `bins`
      moved to the last bin; so the edges are lo + b * (hi - lo) / bins only up to that rounding.
      The maximum is counted twice: the histogram's last bin includes hi, and the overflow bin counts the
      scores >= hi again. Every total below (P, N, the region mass) includes those duplicates.
    - Per bin: the anomalous pixels, the normal pixels, and the region mass, where each anomalous pixel adds
      the float32 value of 1 / (area of its region); regions are the 8-connected components of each image's
      mask, as cv2.connectedComponentsWithStats(connectivity=8) finds them.
    - Curve: one point per threshold k = 0..bins, "anomalous" meaning bin >= k or the overflow bin: TPR and
      recall = TP / P, FPR = FP / N, precision = TP / (TP + FP), PRO = mass / total mass. The points run from
      the overflow bin alone (k = bins) to every pixel ((1, 1) at k = 0); no (0, 0) point is added.
    - P-AUROC: trapezoid rule over the (FPR, TPR) points.
    - P-AP: trapezoid rule over the (recall, precision) points, from the overflow bin's recall to 1: linear
      interpolation of precision, not scikit-learn's step-wise AP, and nothing below the first recall.
    - AUPRO: trapezoid area over the (FPR, PRO) points with FPR <= fpr_limit, plus the segment that crosses
      fpr_limit cut there by linear interpolation, all divided by fpr_limit. ADEval gets that segment's area
      as (area of all points) - (area left of it) - (area right of it) and the cut part as
      area * (r t + (1 - r) t^2), t the cut's fraction of the segment's width, r = y0 / (y0 + (y1 - y0) / 2);
      so where PRO is still 0 at both ends of that segment, r = 0/0 and ADEval's AUPRO is NaN, as it is here.

    NaN with an UndefinedMetricWarning: every metric without an anomalous pixel, P-AUROC and AUPRO without a
    normal pixel, AUPRO where ADEval's own arithmetic is undefined (the 0/0 above, or no curve point at
    FPR <= fpr_limit because more than that fraction of normal pixels share the maximum). ADEval itself
    raises in the cases without anomalous or normal pixels; maps whose scores are all equal raise ValueError
    here, as ADEval refuses them (it asserts min < max).
    """
    bins = int(bins)
    fpr_limit = float(fpr_limit)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    mask, score = metrics._volume(masks, maps)
    curve = _adeval_curve(mask, score, bins)
    return {"P-AUROC": _adeval_auroc(curve), "P-AP": _adeval_ap(curve), "AUPRO": _adeval_aupro(curve, fpr_limit)}


def _adeval_bin(scores, bins):
    """ADEval's bin of every score (0..bins-1) and whether it is also counted in the overflow bin."""
    calc = np.float64 if scores.dtype == np.float64 else np.float32  # torch.histc computes in the input dtype
    s = scores.reshape(-1).astype(calc, copy=False)
    metrics._check_no_nan(s, "maps")
    if s.size == 0:
        raise ValueError("maps hold no pixel")
    lo, hi = s.min(), s.max()
    if not lo < hi:
        raise ValueError(f"ADEval needs maps with max > min, got all scores equal to {lo}")
    # Left to right, each step rounded to `calc`, exactly as torch.histc (CPU and CUDA alike):
    # ((s - lo) * bins) / (hi - lo), truncated; only s = hi can give `bins`, and it joins the last bin.
    position = (s - lo) * calc(bins) / (hi - lo)
    return np.minimum(position.astype(np.int64), bins - 1), s >= hi


def _adeval_curve(mask, score, bins):
    """ADEval's per-threshold counts, in its order: index k = 0..bins is "anomalous when bin >= k"."""
    _, _, width = mask.shape
    b, overflow = _adeval_bin(score, bins)
    runs = metrics.label_runs(mask)
    anomalous, length = runs.pixels(width)  # flat indices, raster order
    region = runs.region
    area = np.bincount(region, weights=length, minlength=runs.n)
    # ADEval keeps 1/area in a float32 weight map, so a region weighs float32(1/area) * area, not exactly 1.
    weight = np.repeat((1.0 / area).astype(np.float32).astype(np.float64)[region], length)

    def stat(counts, over):
        # [underflow (empty), bins..., overflow]; the overflow repeats the scores == max already in the last bin
        return np.concatenate(([0.0], counts, [over])).astype(np.float64)

    b_pos, over_pos = b[anomalous], overflow[anomalous]
    pos = np.bincount(b_pos, minlength=bins)
    neg = np.bincount(b, minlength=bins) - pos
    mass = np.bincount(b_pos, weights=weight, minlength=bins)
    n_over_pos = int(np.count_nonzero(over_pos))
    stats = {"pos": stat(pos, n_over_pos), "neg": stat(neg, int(np.count_nonzero(overflow)) - n_over_pos),
             "mass": stat(mass, float(weight[over_pos].sum()))}

    def above(counts):
        # ADEval's arithmetic: the total minus the cumulative sum from the bottom, threshold by threshold
        low = np.cumsum(counts)
        return low[-1] - low[:-1], float(low[-1])

    (tp, p), (fp, n), (m, m_total) = above(stats["pos"]), above(stats["neg"]), above(stats["mass"])
    return {"tp": tp, "fp": fp, "mass": m, "p": p, "n": n, "m_total": m_total, "n_regions": runs.n}


def _trapezoid(x, y):
    """Trapezoid area under the points (x, y), each term as numpy.trapz forms and sums it."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _ascending(a):
    return a[::-1]  # from k = bins (overflow bin alone) to k = 0 (every pixel)


def _adeval_auroc(c):
    if c["p"] == 0 or c["n"] == 0:
        return metrics._undefined("P-AUROC", f"needs both classes, got {c['p']:.0f} anomalous and {c['n']:.0f} "
                                  "normal pixels")
    return _trapezoid(_ascending(c["fp"] / c["n"]), _ascending(c["tp"] / c["p"]))


def _adeval_ap(c):
    if c["p"] == 0:
        return metrics._undefined("P-AP", "no anomalous pixel")
    predicted = c["tp"] + c["fp"]  # never 0: the overflow bin holds the maximum; ADEval would take precision 1
    precision = np.divide(c["tp"], predicted, out=np.ones_like(predicted), where=predicted > 0)
    return _trapezoid(_ascending(c["tp"] / c["p"]), _ascending(precision))


def _adeval_aupro(c, limit):
    if c["n_regions"] == 0:
        return metrics._undefined("AUPRO", "no anomalous region")
    if c["n"] == 0:
        return metrics._undefined("AUPRO", "no normal pixel")
    fpr, pro = _ascending(c["fp"] / c["n"]), _ascending(c["mass"] / c["m_total"])
    i = int(np.count_nonzero(fpr <= limit))  # fpr ascends, so these points are a prefix
    if i == 0:
        return metrics._undefined("AUPRO", f"ADEval's first curve point is at FPR {fpr[0]} > {limit} (the maximum "
                                  "is shared by too many normal pixels)")
    inside = _trapezoid(fpr[:i], pro[:i])
    if i == fpr.size:  # fpr_limit = 1: nothing to cut (ADEval, fixed at 0.3, never gets here)
        return inside / limit
    crossing = _trapezoid(fpr, pro) - (inside + _trapezoid(fpr[i:], pro[i:]))
    t = (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
    y0, y1 = pro[i - 1], pro[i]
    if y0 + 0.5 * (y1 - y0) == 0:
        # ADEval splits the cut into a rectangle and a triangle in proportion y0 : (y1 - y0) / 2, a 0/0 here
        # (PRO still 0 past fpr_limit), and reports NaN.
        return metrics._undefined("AUPRO", f"PRO is 0 on both sides of FPR {limit}, where ADEval's interpolation "
                                  "is 0/0")
    r = y0 / (y0 + 0.5 * (y1 - y0))
    rect, tri = crossing * r, crossing * (1 - r)
    return float((inside + (rect * t + tri * t * t)) / limit)
