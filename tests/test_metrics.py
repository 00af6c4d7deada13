"""metrics.py against ../shared/fixtures/metrics (every case, 1e-9 absolute), against brute force and a
flood fill, and on properties every correct implementation has (monotone invariance, symmetry, perfect
detector); the streaming histograms against the exact metrics within their own error bounds."""
import json
import math
import warnings
from collections import deque
from functools import lru_cache

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import metrics
from conftest import shared
from metrics import (PixelHistogram, UndefinedMetricWarning, aupro, auroc, average_precision, compute_all,
                     f1_max, label_components)

TOL = 1e-9
CASES = {c["name"]: c for c in json.loads(shared("fixtures", "metrics", "cases.json").read_text())["cases"]}
IMAGE = [n for n, c in CASES.items() if c["kind"] == "image"]
PIXEL = [n for n, c in CASES.items() if c["kind"] == "pixel"]
LIMITS = {"aupro": 0.3, "aupro_0.05": 0.05, "aupro_1.0": 1.0}


@lru_cache(maxsize=None)
def _arrays():
    return load_file(str(shared("fixtures", "metrics", "cases.safetensors")))


def arrays(name):
    a = _arrays()
    if CASES[name]["kind"] == "image":
        return a[name + ".labels"], a[name + ".scores"]
    return a[name + ".masks"], a[name + ".maps"]


def check(compute, expected):
    """expected None: NaN and an UndefinedMetricWarning; otherwise within 1e-9."""
    if expected is None:
        with pytest.warns(UndefinedMetricWarning):
            got = compute()
        assert isinstance(got, float) and math.isnan(got)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a defined metric warns about nothing
            got = compute()
        assert isinstance(got, float)
        assert abs(got - expected) <= TOL, (got, expected)


def pixel_curve_values(masks, maps):
    c = metrics._pixel_curve(masks, maps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        values = {"auroc": c.auroc(), "average_precision": c.average_precision(), "f1_max": c.f1_max()[0]}
        values.update({k: c.aupro(limit) for k, limit in LIMITS.items()})
    return values


def assert_matches(values, expected):
    for k, e in expected.items():
        if e is None:
            assert math.isnan(values[k]), k
        else:
            assert abs(values[k] - e) <= TOL, (k, values[k], e)


def bucketed(monkeypatch, n, max_buckets=None):
    """Force the bucketed counting (no full sort), in about five chunks, optionally with few buckets."""
    monkeypatch.setattr(metrics, "_SORT_ALL_MAX", -1)
    monkeypatch.setattr(metrics, "_CHUNK", n // 5 + 1)
    if max_buckets:
        monkeypatch.setattr(metrics, "_MAX_BUCKETS", max_buckets)


# -----------------------------------------------------------------------------------------------------
# Fixture cases


def check_ranking_metrics(labels, scores, expected):
    """AUROC, AP and F1-max of one fixture case (image labels and scores, or pixel masks and maps)."""
    check(lambda: auroc(labels, scores), expected["auroc"])
    check(lambda: average_precision(labels, scores), expected["average_precision"])
    check(lambda: f1_max(labels, scores), expected["f1_max"])


@pytest.mark.parametrize("name", IMAGE)
def test_image_case(name):
    check_ranking_metrics(*arrays(name), CASES[name]["expected"])


@pytest.mark.parametrize("name", PIXEL)
def test_pixel_case(name):
    masks, maps = arrays(name)
    e = CASES[name]["expected"]
    # Pixel AUROC, AP and F1-max pool every pixel of every image as one sample.
    check_ranking_metrics(masks, maps, e)
    for key, limit in LIMITS.items():
        check(lambda: aupro(masks, maps, fpr_limit=limit), e[key])
    check(lambda: aupro(masks, maps), e["aupro"])  # 0.3 is the default


@pytest.mark.parametrize("path", ["sort", "buckets", "crowded-buckets"])
@pytest.mark.parametrize("name", PIXEL)
def test_pixel_case_counting_paths(monkeypatch, name, path):
    """Both ways of counting scores at the thresholds give the same values: one full sort, and buckets
    (comparisons, partial sort), here also with so few buckets that most are shared by several thresholds."""
    masks, maps = arrays(name)
    if path == "sort":
        monkeypatch.setattr(metrics, "_SORT_ALL_MAX", maps.size)
    else:
        bucketed(monkeypatch, maps.size, max_buckets=16 if path == "crowded-buckets" else None)
    assert_matches(pixel_curve_values(masks, maps), CASES[name]["expected"])


@pytest.mark.parametrize("name", IMAGE)
def test_image_case_bucketed_counting(monkeypatch, name):
    labels, scores = arrays(name)
    bucketed(monkeypatch, scores.size)
    e = CASES[name]["expected"]
    check(lambda: auroc(labels, scores), e["auroc"])
    check(lambda: average_precision(labels, scores), e["average_precision"])
    check(lambda: f1_max(labels, scores), e["f1_max"])


def test_compute_all_mvtec_like():
    labels, scores = arrays("img_mvtec_like")
    masks, maps = arrays("pix_mvtec_like")
    # The image case is the pixel case's labels and max-of-map scores.
    assert np.array_equal(labels, masks.reshape(len(masks), -1).any(1))
    assert np.array_equal(scores, maps.reshape(len(maps), -1).max(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = compute_all(labels, scores, masks, maps)
    assert list(r) == ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]
    assert all(type(v) is float for v in r.values())
    ei, ep = CASES["img_mvtec_like"]["expected"], CASES["pix_mvtec_like"]["expected"]
    expected = [ei["auroc"], ei["average_precision"], ei["f1_max"],
                ep["auroc"], ep["average_precision"], ep["f1_max"], ep["aupro"]]
    for got, e in zip(r.values(), expected):
        assert abs(got - e) <= TOL
    r05 = compute_all(labels, scores, masks, maps, fpr_limit=0.05)
    assert abs(r05["AUPRO"] - ep["aupro_0.05"]) <= TOL


def test_compute_all_undefined_is_nan_with_warnings():
    labels, scores = arrays("img_no_positive")
    masks, maps = arrays("pix_no_region")
    with pytest.warns(UndefinedMetricWarning) as record:
        r = compute_all(labels, scores, masks, maps)
    assert all(math.isnan(v) for v in r.values())
    messages = " ".join(str(w.message) for w in record)
    for key in r:
        assert key in messages


def test_undefined_cases():
    # Only normal samples, only anomalous samples, nothing at all.
    with pytest.warns(UndefinedMetricWarning, match="AUROC"):
        assert math.isnan(auroc([1, 1, 1], [0.1, 0.5, 0.2]))
    assert average_precision([1, 1, 1], [0.1, 0.5, 0.2]) == 1.0
    assert f1_max([1, 1, 1], [0.1, 0.5, 0.2]) == 1.0
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(auroc([], []))
    masks = np.ones((2, 4, 4), bool)
    with pytest.warns(UndefinedMetricWarning, match="normal pixel"):
        assert math.isnan(aupro(masks, np.random.default_rng(0).random((2, 4, 4))))


# -----------------------------------------------------------------------------------------------------
# Properties


def dense_rank(x):
    return np.unique(x, return_inverse=True)[1].reshape(np.shape(x))


@pytest.mark.parametrize("name", ["img_random_ties", "img_float32_close", "img_integer", "img_mvtec_like"])
def test_image_monotone_invariance(name):
    labels, scores = arrays(name)
    s = scores.astype(np.float64)
    warped = np.exp(3 * s / max(1.0, np.abs(s).max())) - 7
    assert np.unique(warped).size == np.unique(s).size  # the transform merged no two scores
    for fn in (auroc, average_precision, f1_max):
        base = fn(labels, scores)
        assert abs(fn(labels, warped) - base) <= 1e-12
        assert abs(fn(labels, dense_rank(scores)) - base) <= 1e-12  # integer ranks, ties kept


@pytest.mark.parametrize("name", ["pix_quantised", "pix_connectivity", "pix_float16", "pix_limit_vertex"])
def test_pixel_monotone_invariance(name):
    masks, maps = arrays(name)
    base = pixel_curve_values(masks, maps)
    s = maps.astype(np.float64)
    warped = np.arctan(2 * s) * 10 + 3
    assert np.unique(warped).size == np.unique(s).size
    for transformed in (warped, dense_rank(maps)):
        got = pixel_curve_values(masks, transformed)
        for k in base:
            assert abs(got[k] - base[k]) <= 1e-12, k


@pytest.mark.parametrize("name", ["img_random_ties", "img_integer", "img_float32_close", "img_inverted"])
def test_auroc_of_negated_scores(name):
    labels, scores = arrays(name)
    assert abs(auroc(labels, -scores) - (1 - auroc(labels, scores))) <= 1e-12


def test_pixel_auroc_of_negated_maps():
    for name in ("pix_mvtec_like", "pix_quantised"):
        masks, maps = arrays(name)
        assert abs(auroc(masks, -maps) - (1 - auroc(masks, maps))) <= 1e-12


def random_masks(rng, n, h, w, density=0.02, blobs=3):
    """Blob-shaped masks: thresholded box-blurred noise, on about 2/3 of the images."""
    noise = rng.random((n, h + 8, w + 8))
    k = np.ones(9) / 9
    for axis in (1, 2):
        noise = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), axis, noise)
    masks = noise > np.quantile(noise, 1 - density * blobs / 3)
    masks[rng.random(n) < 1 / 3] = False
    return masks


def test_perfect_detector_gives_one_everywhere():
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 12, 40, 48, density=0.05)
    assert 0 < masks.any(axis=(1, 2)).sum() < len(masks)
    maps = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape)).astype(np.float32)
    labels, scores = masks.any(axis=(1, 2)), maps.max(axis=(1, 2))
    r = compute_all(labels, scores, masks, maps)
    assert all(abs(v - 1.0) <= 1e-12 for v in r.values()), r
    assert abs(aupro(masks, maps, fpr_limit=0.01) - 1.0) <= 1e-12
    hist = PixelHistogram(bins=1000, lo=0, hi=2)
    hist.update(masks, maps)
    assert all(abs(v - 1.0) <= 1e-12 for v in hist.compute().values())


def test_constant_map():
    masks, _ = arrays("pix_mvtec_like")
    r = pixel_curve_values(masks, np.zeros(masks.shape, np.float32))
    assert r["auroc"] == 0.5 and abs(r["aupro"] - 0.15) <= 1e-12 and abs(r["aupro_1.0"] - 0.5) <= 1e-12
    assert abs(r["average_precision"] - masks.mean()) <= 1e-12


# -----------------------------------------------------------------------------------------------------
# Counting at thresholds (the core of the large-set path) against brute force


@pytest.mark.parametrize("kind", ["float64", "float32", "float16", "int32", "signed-zero-inf"])
@pytest.mark.parametrize("max_buckets", [None, 8])
def test_count_at_or_above_brute_force(monkeypatch, kind, max_buckets):
    rng = np.random.default_rng(7)
    n = 5000
    if kind == "int32":
        values = rng.integers(-20, 20, n).astype(np.int32)
    elif kind == "signed-zero-inf":
        values = rng.choice(np.array([-np.inf, -1.5, -0.0, 0.0, 1e-300, 0.25, 3.0, np.inf]), n)
    else:
        values = np.round(rng.normal(size=n), 2).astype(kind)  # plenty of ties
    thresholds = np.unique(rng.choice(values, 300).astype(metrics._key_dtype(values.dtype)))
    thresholds = thresholds[np.isfinite(thresholds)] if kind != "signed-zero-inf" else thresholds[1:-1]
    v = values.astype(np.float64)
    t = thresholds.astype(np.float64)[:, None]
    want = (v >= t).sum(1), (v > t).sum(1)
    for force in (False, True):
        if force:
            bucketed(monkeypatch, n, max_buckets)
        ge, gt = metrics._count_at_or_above(values, thresholds)
        assert np.array_equal(ge, want[0]) and np.array_equal(gt, want[1])


# -----------------------------------------------------------------------------------------------------
# Connected components


def flood_fill_labels(mask):
    """Reference: 8-connected breadth-first flood fill, seeds in raster order."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if mask[y0, x0] and not labels[y0, x0]:
                n += 1
                labels[y0, x0] = n
                queue = deque([(y0, x0)])
                while queue:
                    y, x = queue.popleft()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            yy, xx = y + dy, x + dx
                            if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                                labels[yy, xx] = n
                                queue.append((yy, xx))
    return labels, n


def test_label_components_random_masks():
    rng = np.random.default_rng(3)
    shapes = [(1, 1), (1, 30), (30, 1), (17, 23), (40, 40), (64, 33)]
    for density in (0.05, 0.3, 0.5, 0.7):
        for shape in shapes:
            mask = rng.random(shape) < density
            got, n = label_components(mask)
            want, n_want = flood_fill_labels(mask)
            assert got.dtype == np.int32 and got.shape == mask.shape
            assert n == n_want and np.array_equal(got, want), (density, shape)


def test_label_components_corner_contacts():
    def count(rows):
        return label_components(np.array([[c == "#" for c in r] for r in rows]))[1]

    assert count(["#...", ".#..", "..#.", "...#"]) == 1  # diagonal chain
    assert count(["...#", "..#.", ".#..", "#..."]) == 1  # anti-diagonal chain
    assert count(["#.#.#", ".#.#.", "#.#.#"]) == 1  # checkerboard
    assert count(["##..", "##..", "..##", "..##"]) == 1  # squares touching at one corner
    assert count(["##...", "##...", "...##", "...##"]) == 2  # a gap of one pixel separates them
    assert count(["#.#", "...", "#.#"]) == 4
    assert count(["....", "...."]) == 0
    assert count(["####", "####"]) == 1
    # A U shape and a spiral: the two arms meet only at the far end.
    assert count(["#...#", "#...#", "#...#", "#####"]) == 1
    spiral = ["#########", "........#", "#######.#", "#.....#.#", "#.###.#.#", "#.#...#.#", "#.#####.#",
              "#.......#", "#########"]
    got, n = label_components(np.array([[c == "#" for c in r] for r in spiral]))
    want, n_want = flood_fill_labels(np.array([[c == "#" for c in r] for r in spiral]))
    assert n == n_want and np.array_equal(got, want)


def test_regions_never_cross_images():
    # Same place in consecutive images, and touching image edges: one region per image and blob.
    masks, _ = arrays("pix_stacked")
    per_image = sum(label_components(m)[1] for m in masks)
    assert per_image == CASES["pix_stacked"]["info"]["n_regions_8conn"] == 12
    assert metrics._region_pixels(masks.astype(bool))[2] == 12
    edge = np.zeros((2, 3, 3), bool)
    edge[0, 2, 2] = edge[1, 0, 0] = True  # bottom-right of image 0, top-left of image 1
    assert metrics._region_pixels(edge)[2] == 2


def test_volume_labelling_matches_per_image():
    rng = np.random.default_rng(5)
    masks = rng.random((9, 20, 26)) < 0.45
    where, weights, n = metrics._region_pixels(masks)
    expected_weights, total = [], 0
    for m in masks:
        labels, k = label_components(m)
        size = np.bincount(labels.ravel())
        expected_weights.append(1.0 / size[labels[m]])
        total += k
    assert n == total
    assert np.array_equal(where, np.flatnonzero(masks))
    assert np.array_equal(weights, np.concatenate(expected_weights))


# -----------------------------------------------------------------------------------------------------
# Streaming


def exact_pixel(masks, maps):
    v = pixel_curve_values(masks, maps)
    return {"P-AUROC": v["auroc"], "P-AP": v["average_precision"], "P-F1max": v["f1_max"],
            "AUPRO": v["aupro"]}


def stream(masks, maps, batch=7, **kw):
    hist = PixelHistogram(**kw)
    for i in range(0, len(masks), batch):
        hist.update(masks[i:i + batch], maps[i:i + batch])
    return hist


@pytest.mark.parametrize("name", ["pix_mvtec_like", "pix_normal_images", "pix_quantised"])
@pytest.mark.parametrize("bins", [64, 4096, 65536])
def test_streaming_against_exact(name, bins):
    masks, maps = arrays(name)
    lo, hi = math.floor(float(maps.min())), math.ceil(float(maps.max())) + 1  # cover the maps
    hist = stream(masks, maps, bins=bins, lo=lo, hi=hi)
    assert hist.resolution == (hi - lo) / bins
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing clipped, nothing undefined
        got = hist.compute()
    bounds = hist.error_bounds()
    # The histogram is exactly the metrics of the quantised scores ...
    quantised = exact_pixel(masks, hist.bin_index(maps))
    # ... and so within its own error bounds of the exact metrics.
    exact = exact_pixel(masks, maps)
    for k in got:
        assert abs(got[k] - quantised[k]) <= TOL, k
        assert abs(got[k] - exact[k]) <= bounds[k] + 1e-12, (k, got[k], exact[k], bounds[k])
    if bins == 65536 and name == "pix_mvtec_like":  # fine bins: the bounds themselves are small
        assert max(bounds.values()) < 1e-4, bounds


def test_streaming_synthetic_with_clipping():
    rng = np.random.default_rng(11)
    masks = random_masks(rng, 10, 32, 40, density=0.08)
    maps = rng.normal(0.3, 0.3, masks.shape) + 0.8 * masks  # some scores below 0 and above 2
    hist = stream(masks, maps, batch=3, bins=2000, lo=0.0, hi=2.0)
    outside = int(((maps < 0) | (maps >= 2)).sum())
    assert hist.outside == outside > 0
    with pytest.warns(RuntimeWarning, match="outside"):
        got = hist.compute()
    quantised = exact_pixel(masks, np.clip(np.floor(maps * 1000), 0, 1999).astype(np.int64))
    exact, bounds = exact_pixel(masks, maps), hist.error_bounds()
    for k in got:
        assert abs(got[k] - quantised[k]) <= TOL, k
        assert abs(got[k] - exact[k]) <= bounds[k] + 1e-12, k


def test_streaming_inputs_and_undefined():
    masks, maps = arrays("pix_float16")
    a = stream(masks, maps, lo=-1, hi=5)
    b = stream(torch.from_numpy(masks).bool(), torch.from_numpy(maps), lo=-1, hi=5)
    assert a.compute() == b.compute()
    assert np.array_equal(a.region_mass, b.region_mass) and a.n_regions == b.n_regions == 23
    empty, maps0 = arrays("pix_no_region")
    with pytest.warns(UndefinedMetricWarning):
        r = stream(empty, maps0, lo=-5, hi=5).compute()
    assert all(math.isnan(v) for v in r.values())
    with pytest.raises(ValueError):
        PixelHistogram(bins=10, lo=1, hi=1)


# -----------------------------------------------------------------------------------------------------
# Inputs


def test_torch_and_numpy_inputs_agree():
    labels, scores = arrays("img_mvtec_like")
    masks, maps = arrays("pix_mvtec_like")
    ref = compute_all(labels, scores, masks, maps)
    got = compute_all(torch.from_numpy(labels).bool(), torch.from_numpy(scores),
                      torch.from_numpy(masks), torch.from_numpy(maps))
    assert got == ref
    # (N, 1, H, W) maps, 0/255 masks and lists work too.
    got = compute_all(labels.tolist(), scores.tolist(), masks[:, None] * 255, maps[:, None])
    assert all(abs(got[k] - ref[k]) <= 1e-12 for k in ref)


def test_float16_maps_used_exactly():
    masks, maps = arrays("pix_float16")
    assert maps.dtype == np.float16
    e = CASES["pix_float16"]["expected"]
    for m in (maps, torch.from_numpy(maps)):
        assert abs(aupro(masks, m) - e["aupro"]) <= TOL
        assert abs(average_precision(masks, m) - e["average_precision"]) <= TOL
    # Rounding the float32 maps of another case to float16 changes the answer: no silent rounding here.
    masks32, maps32 = arrays("pix_mvtec_like")
    assert aupro(masks32, maps32) != aupro(masks32, maps32.astype(np.float16))
    bf16 = torch.from_numpy(maps32).bfloat16()
    assert aupro(masks32, bf16) == aupro(masks32, bf16.float().numpy())


def test_bad_inputs_raise():
    masks, maps = arrays("pix_connectivity")
    bad = maps.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, bad)
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1, 0], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="shape"):
        aupro(masks, maps[:, :-1])
    with pytest.raises(ValueError, match="binarise"):
        aupro(masks * 0.7, maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0)
    with pytest.raises(ValueError):
        auroc([0, 1], [0.5])


def test_bucketed_counting_rejects_nan(monkeypatch):
    masks, maps = arrays("pix_mvtec_like")
    bad = maps.copy()
    bad[-1, -1, -1] = np.nan  # a normal pixel, so only the counting pass can see it
    assert not masks[-1, -1, -1]
    bucketed(monkeypatch, maps.size)
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, bad)


def _brute_force_f1(labels, scores):
    """Every distinct score as threshold, highest first: (best F1, the highest threshold reaching it)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    best = (-1.0, None)
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[0]:
            best = (f1, t)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_f1_threshold_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.7)
    labels[0] = True
    scores = np.round(rng.normal(labels * rng.uniform(0, 2), 1.0), int(rng.integers(1, 4)))  # ties too
    f1, t = metrics.f1_threshold(labels, scores)
    bf1, bt = _brute_force_f1(labels, scores)
    assert f1 == pytest.approx(bf1, abs=1e-12) and t == bt
    assert f1 == metrics.f1_max(labels, scores)
    masks = rng.random((3, 8, 8)) < 0.2
    maps = np.round(rng.random((3, 8, 8)) + masks * 0.5, 2)
    out = compute_all(labels, scores, masks, maps, thresholds=True)
    assert out["I-threshold"] == bt and out["P-threshold"] == _brute_force_f1(masks.ravel(), maps.ravel())[1]
    hist = PixelHistogram(bins=1 << 12, lo=0.0, hi=2.0)
    hist.update(masks, maps)
    assert abs(hist.compute(thresholds=True)["P-threshold"] - out["P-threshold"]) <= hist.resolution


# -----------------------------------------------------------------------------------------------------
# The reference at the top of metrics.py, and the fast path against it


def reference_values(name):
    if CASES[name]["kind"] == "image":
        labels, scores = arrays(name)
        r = metrics.reference_metrics(labels, scores)
        return {"auroc": r["auroc"], "average_precision": r["ap"], "f1_max": r["f1"]}
    masks, maps = arrays(name)
    regions = metrics.reference_pixel_regions(masks)
    r = {k: metrics.reference_metrics(masks, maps, limit, regions) for k, limit in LIMITS.items()}
    values = {"auroc": r["aupro"]["auroc"], "average_precision": r["aupro"]["ap"], "f1_max": r["aupro"]["f1"]}
    values.update({k: r[k]["aupro"] for k in LIMITS})
    return values


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_reference_gives_every_expected_value(name):
    assert_matches(reference_values(name), CASES[name]["expected"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_fast_path_equals_the_reference_on_every_case(name):
    want = reference_values(name)
    if CASES[name]["kind"] == "image":
        labels, scores = arrays(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            got = {"auroc": auroc(labels, scores), "average_precision": average_precision(labels, scores),
                   "f1_max": f1_max(labels, scores)}
    else:
        got = pixel_curve_values(*arrays(name))
    for k, w in want.items():
        assert (math.isnan(w) and math.isnan(got[k])) or abs(got[k] - w) <= 1e-12, (k, got[k], w)


@pytest.mark.parametrize("seed", range(6))
def test_the_fast_path_equals_the_reference_on_random_ties(seed, monkeypatch):
    """Scores drawn from a handful of values (many ties), masks of random blobs; every metric and both F1-max
    thresholds, through the full sort and through bucketed counting."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 24, 31), bool)
    for i in range(1, 5):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 20), rng.integers(0, 27)
            masks[i, y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
    maps = rng.integers(0, 9, masks.shape).astype(np.float32) / 8 + 0.25 * masks * rng.integers(0, 2, masks.shape)
    labels, scores = masks.any(axis=(1, 2)), rng.integers(0, 4, 5).astype(np.float64)
    labels[0], scores[1] = False, scores[0]  # at least one normal image, and a tie across the classes
    image = metrics.reference_metrics(labels, scores)
    pixel = metrics.reference_metrics(masks, maps, 0.3, metrics.reference_pixel_regions(masks))
    want = {"I-AUROC": image["auroc"], "I-AP": image["ap"], "I-F1max": image["f1"], "P-AUROC": pixel["auroc"],
            "P-AP": pixel["ap"], "P-F1max": pixel["f1"], "AUPRO": pixel["aupro"],
            "I-threshold": image["threshold"], "P-threshold": pixel["threshold"]}
    for path in ("sort", "bucketed"):
        if path == "bucketed":
            bucketed(monkeypatch, masks.size, max_buckets=7)
        got = compute_all(labels, scores, masks, maps, thresholds=True)
        for k, w in want.items():
            assert abs(got[k] - w) <= 1e-12, (path, k, got[k], w)
    assert np.array_equal(metrics.reference_pixel_regions(masks[1:2])[0] > 0, masks[1])
    assert metrics.reference_regions(masks[1])[1] == label_components(masks[1])[1]
