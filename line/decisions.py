"""The decision rule a calibration stores in a checkpoint (predict.py --calibrate writes it, predict.calibration
builds it): thresholds per class and pooled, and anomalib's normalised score. A class calibrated on its own
(--calibrate --classes) has its own record in "class_rules", with its pixel threshold and ranges.
"""
import torch

# What every calibration holds (predict.calibration builds it; older ones may lack the other keys it writes).
CALIBRATION_KEYS = {"image_threshold", "pixel_threshold", "score_range", "heat_range", "classes"}


def read_calibration(meta: dict, path, log=print):
    """The calibration in a checkpoint's metadata, or None (with a note if it is there but unusable)."""
    cal = meta.get("calibration")
    if cal is None or (isinstance(cal, dict) and CALIBRATION_KEYS <= set(cal)):
        return cal
    log(f"note: {path}: unreadable calibration metadata, ignored (predict.py --calibrate writes a new one)")
    return None


def class_rule(calibration, cls=None) -> dict:
    """What decides an image of class `cls`: image_threshold (see class_threshold), and pixel_threshold,
    score_range and heat_range, the class's own where it was calibrated on its own, else the pooled rule's."""
    own = calibration.get("class_rules", {}).get(cls, {})
    found = {k: own.get(k, calibration[k]) for k in ("pixel_threshold", "score_range", "heat_range")}
    found["image_threshold"] = class_threshold(calibration, cls)
    return found


def normalise(score, calibration, threshold, cls=None):
    """anomalib's normalised score, (score - threshold) / (max - min) + 0.5 over the calibration scores (of class
    `cls` where it was calibrated on its own), clipped to [0, 1]: a float for a float, a tensor for a tensor (the
    exported graph)."""
    lo, hi = class_rule(calibration, cls)["score_range"]
    v = (score - threshold) / max(hi - lo, 1e-12) + 0.5
    if isinstance(v, torch.Tensor):
        return v.clamp(0, 1)
    return min(max(float(v), 0.0), 1.0)


def class_threshold(calibration, cls=None):
    """The image threshold for class `cls`: its own when the calibration has one, else the pooled one."""
    return calibration.get("classes", {}).get(cls, calibration["image_threshold"])


def decide(score, calibration, cls=None) -> dict:
    """One image score under a calibration: threshold (see class_threshold), normalised score (see normalise)
    and decision, "anomalous" when the score is at or above the threshold, else "normal"."""
    t = class_threshold(calibration, cls)
    return dict(threshold=t, normalised=normalise(score, calibration, t, cls),
                decision="anomalous" if score >= t else "normal")
