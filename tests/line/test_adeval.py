"""line/adeval.py against numbers ADEval 1.1.0 itself reported (tests/golden/adeval_1.1.0.*, made
by running ADEval's EvalAccumulatorCuda on the CPU exactly as the official INP-Former evaluation calls it; ADEval
is not needed here), next to the exact metrics, and on the cases where it is undefined."""
import json
import math
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import ROOT
import metrics
import line.adeval
from line.adeval import adeval_pixel_metrics
from metrics import UndefinedMetricWarning, compute_all

GOLDEN = ROOT / "tests" / "golden"
FIXTURE = json.loads((GOLDEN / "adeval_1.1.0.json").read_text())
CLASSES = list(FIXTURE["expected"])
METRICS = ["P-AUROC", "P-AP", "AUPRO"]
# The implementation repeats ADEval's arithmetic step by step and agrees to the last bit on this fixture, so the
# tolerance is far below the required 1e-6: a looser one would not hold the float32 region weights
# (ADEval stores 1/area in float32), which move AUPRO here by only ~7e-10.
TOL = 1e-12


@lru_cache(maxsize=None)
def _arrays():
    return load_file(str(GOLDEN / "adeval_1.1.0.safetensors"))


def arrays(name):
    a = _arrays()
    return a[name + ".masks"], a[name + ".maps"]


def test_fixture_is_what_it_says():
    assert FIXTURE["adeval_version"] == "1.1.0"
    assert {"smooth", "quantised", "hard", "inverted"} <= set(CLASSES)
    for name in CLASSES:
        masks, maps = arrays(name)
        assert masks.dtype == np.uint8 and maps.dtype == np.float32 and masks.shape == maps.shape
        assert masks.ndim == 3 and set(np.unique(masks)) <= {0, 1}
    size = sum((GOLDEN / f).stat().st_size for f in ("adeval_1.1.0.safetensors", "adeval_1.1.0.json"))
    assert size < 1 << 20


@lru_cache(maxsize=None)
def adeval(name):
    """(results, warnings) of adeval_pixel_metrics on one fixture class."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = adeval_pixel_metrics(*arrays(name))
    return got, tuple(w for w in caught)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", CLASSES)
def test_matches_adeval(name, metric):
    expected = FIXTURE["expected"][name][metric]
    got, caught = adeval(name)
    assert isinstance(got[metric], float)
    if expected is None:  # ADEval reported NaN
        assert math.isnan(got[metric])
        assert any(issubclass(w.category, UndefinedMetricWarning) and metric in str(w.message) for w in caught)
    else:
        assert abs(got[metric] - expected) <= TOL, (got[metric], expected)
        # the only warnings allowed are about other, undefined metrics
        assert all(issubclass(w.category, UndefinedMetricWarning) and not str(w.message).startswith(metric + " ")
                   for w in caught), [str(w.message) for w in caught]


def test_adeval_nan_aupro_is_the_zero_over_zero_case():
    """'inverted' scores anomalies lowest: PRO is still 0 on both sides of FPR 0.3, where ADEval's interpolation
    divides 0 by 0. The other two metrics stay defined (and poor)."""
    got, caught = adeval("inverted")
    assert math.isnan(got["AUPRO"]) and got["P-AUROC"] < 0.01
    assert [str(w.message) for w in caught if issubclass(w.category, UndefinedMetricWarning)] == [
        "AUPRO is undefined: PRO is 0 on both sides of FPR 0.3, where ADEval's interpolation is 0/0; returning NaN"]


# Binned, trapezoidal, with the maximum counted twice: close to the exact metrics, not equal. On 'quantised' the
# maximum is shared by 74 pixels (58 anomalous), and counting them twice alone lifts P-AUROC by ~0.0065 and
# AUPRO by ~0.016; elsewhere the two agree to ~1e-3.
CLOSE = {"smooth": 0.005, "hard": 0.005, "quantised": 0.03}


@pytest.mark.parametrize("name", sorted(CLOSE))
def test_close_to_exact_metrics(name):
    masks, maps = arrays(name)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    exact = compute_all(labels, maps.reshape(len(maps), -1).max(axis=1), masks, maps)
    got, _ = adeval(name)
    for metric in METRICS:
        assert abs(got[metric] - exact[metric]) <= CLOSE[name], (metric, got[metric], exact[metric])
    assert any(got[m] != exact[m] for m in METRICS)  # it is a different protocol


def test_torch_input_and_float64_maps():
    masks, maps = arrays("smooth")
    assert adeval_pixel_metrics(torch.from_numpy(masks), torch.from_numpy(maps)) == adeval("smooth")[0]
    # float64 maps are binned in float64 (torch.histc computes in the input dtype): close, not necessarily equal
    wide = adeval_pixel_metrics(masks.astype(bool), maps.astype(np.float64))
    for metric in METRICS:
        assert abs(wide[metric] - adeval("smooth")[0][metric]) < 1e-3


def test_no_anomalous_pixel_is_undefined():
    """ADEval itself fails an assertion here; the project's rule is NaN with an UndefinedMetricWarning."""
    masks, maps = arrays("smooth")
    normal = masks.reshape(len(masks), -1).max(axis=1) == 0
    assert normal.any()
    with pytest.warns(UndefinedMetricWarning) as record:
        got = adeval_pixel_metrics(masks[normal], maps[normal])
    assert set(got) == set(METRICS) and all(math.isnan(v) for v in got.values())
    assert {str(w.message).split(" ")[0] for w in record} == set(METRICS)


def test_no_normal_pixel():
    """Without normal pixels P-AUROC and AUPRO are NaN (ADEval raises); P-AP stays defined: precision is 1 at every
    point, from the recall of the overflow bin (the maximum, counted twice: 1 of 129) to 1."""
    rng = np.random.default_rng(0)
    maps = rng.random((2, 8, 8)).astype(np.float32)
    with pytest.warns(UndefinedMetricWarning) as record:
        got = adeval_pixel_metrics(np.ones((2, 8, 8), np.uint8), maps)
    assert math.isnan(got["P-AUROC"]) and math.isnan(got["AUPRO"])
    assert got["P-AP"] == pytest.approx(1 - 1 / 129, abs=1e-15)
    assert {str(w.message).split(" ")[0] for w in record} == {"P-AUROC", "AUPRO"}


def test_invalid_inputs():
    masks, maps = arrays("hard")
    with pytest.raises(ValueError, match="max > min"):
        adeval_pixel_metrics(masks, np.full(maps.shape, 0.5, np.float32))
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        adeval_pixel_metrics(masks, bad)
    with pytest.raises(ValueError, match="differ in shape"):
        adeval_pixel_metrics(masks[:1], maps)
    with pytest.raises(ValueError, match="bins"):
        adeval_pixel_metrics(masks, maps, bins=0)
    with pytest.raises(ValueError, match="fpr_limit"):
        adeval_pixel_metrics(masks, maps, fpr_limit=0)


def test_more_bins_approach_the_exact_auroc():
    masks, maps = arrays("hard")
    labels = masks.reshape(len(masks), -1).max(axis=1)
    exact = compute_all(labels, maps.reshape(len(maps), -1).max(axis=1), masks, maps)
    assert abs(adeval_pixel_metrics(masks, maps, bins=1 << 16)["P-AUROC"] - exact["P-AUROC"]) < 1e-4


def test_aupro_cut_is_the_linear_interpolation():
    """With every region a 4x4 square (weight 1/16, exact in float32) PRO is TPR: the AUPRO up to FPR 1 is then
    the P-AUROC, and up to 0.3 it is the area of the same (FPR, TPR) points cut at 0.3 by linear interpolation
    (metrics._area_up_to), whatever ADEval's rectangle-and-triangle route to it."""
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 32, 32), np.uint8)
    for m in masks:
        for y, x in rng.integers(0, 4, size=(2, 2)) * 8:  # apart: squares never touch, at most coincide
            m[y:y + 4, x:x + 4] = 1
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    whole = adeval_pixel_metrics(masks, maps, fpr_limit=1.0)
    assert whole["AUPRO"] == pytest.approx(whole["P-AUROC"], abs=1e-15)
    c = line.adeval._adeval_curve(masks.astype(bool), maps, 200)
    fpr, tpr = (c["fp"] / c["n"])[::-1], (c["tp"] / c["p"])[::-1]
    for limit in (0.3, 0.05):
        expected = metrics._area_up_to(fpr, tpr, limit) / limit
        assert adeval_pixel_metrics(masks, maps, fpr_limit=limit)["AUPRO"] == pytest.approx(expected, abs=1e-12)
