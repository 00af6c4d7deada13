"""predict.py, the line: --calibrate (the rule, stored with every tensor unchanged), --images (scores, decisions,
pictures; a class threshold only when --classes names it), --export (ONNX against PyTorch), and one-line errors."""
import csv
import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import inpformer
import line.decisions
import line.frames
import metrics
import predict
import train
from conftest import BATCH, CROP, GEOMETRY, IMAGE, ROOT, expect_one_line_error, graph_on_predictions, run_main, shared

TINY = "fixtures", "official_tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv):
    return run_main(predict.main, *argv)


def test_images_writes_a_csv_and_heatmaps(ckpt, model, demo, tmp_path):
    folder = tmp_path / "line"
    (folder / "b").mkdir(parents=True)
    shutil.copy(f"{demo}/tiles/test/good/000.png", folder / "000.png")
    shutil.copy(f"{demo}/tiles/test/spot/000.png", folder / "b" / "000.png")  # same name, other folder
    shutil.copy(f"{demo}/fabric/test/scratch/001.png", folder / "b" / "x.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    r = run_cli("--ckpt", ckpt, "--images", folder, "--out", out, "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [str(folder / "000.png"), str(folder / "b" / "000.png"),
                                             str(folder / "b" / "x.png")]
    x = torch.stack([data.load_image(row["path"], GEOMETRY) for row in rows])
    _, want = model.predict(x)
    for row, s in zip(rows, want):
        assert math.isfinite(float(row["score"])) and abs(float(row["score"]) - float(s)) < 1e-5
    assert len({row["heatmap"] for row in rows}) == 3
    for row in rows:  # the test checkpoint has no calibration: scores only, on one scale over the three
        assert row["decision"] == "" and row["normalised_score"] == ""
        with Image.open(out / "heatmaps" / row["heatmap"]) as im:
            assert im.size == (2 * 256 + 84, 14 + 256)
    assert "no decisions: the checkpoint has no calibration" in r.stdout


def split_halves(demo, root):
    """The demo test set dealt into two MVTec-layout roots, each image with its mask: [(root, [samples])] x 2."""
    halves = [(root / "a", []), (root / "b", [])]
    for cls in data.list_classes("folder", demo):
        for i, s in enumerate(data.list_samples("folder", demo, cls, "test")):
            half, picked = halves[i % 2]
            image = half / cls / "test" / s.defect / os.path.basename(s.image)
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(s.image, image)
            if s.mask:
                mask = half / cls / "ground_truth" / s.defect / os.path.basename(s.mask)
                mask.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(s.mask, mask)
            picked.append(dataclasses.replace(s, image=str(image)))
    return halves


def test_calibrate_on_one_half_decide_on_the_other(ckpt, demo, tmp_path, capsys):
    """--calibrate stores the rule in the checkpoint, every tensor bit-identical; --images then decides, the
    threshold at normalised score 0.5; on the calibration's fixed scale normal maps are cooler than defective."""
    (a, _), (b, held_out) = split_halves(demo, tmp_path)
    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    before, meta_before = load_file(path), inpformer.read_checkpoint_metadata(path)
    r = run_cli("--ckpt", path, "--data-root", a, "--calibrate", "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    after, meta = load_file(path), inpformer.read_checkpoint_metadata(path)
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    cal = meta.pop("calibration")
    assert meta == meta_before and cal["rule"] == {"image": "f1-max", "pixel": "f1-max"}
    # the rule: F1-max thresholds of the half's scores, per class and pooled
    model = inpformer.load_model(path)
    pooled = ([], [])
    for cls in ("fabric", "tiles"):
        ds = data.test_set("folder", a, cls, GEOMETRY)
        labels = torch.tensor([s.label for s in ds.samples])
        scores = model.predict(torch.stack([ds[i]["image"] for i in range(len(ds))]))[1]
        assert cal["classes"][cls] == pytest.approx(metrics.f1_threshold(labels, scores)[1], abs=1e-6)
        pooled[0].append(labels)
        pooled[1].append(scores)
    want = metrics.f1_threshold(torch.cat(pooled[0]), torch.cat(pooled[1]))[1]
    assert cal["image_threshold"] == pytest.approx(want, abs=1e-6)
    assert f"calibrated {path}" in r.stdout

    rows = {}
    for cls in ("fabric", "tiles"):  # each class's images with its own threshold, as --classes names it
        r = run_cli("--ckpt", path, "--images", b / cls / "test", "--classes", cls, "--workers", 0,
                    "--out", tmp_path / "pred" / cls)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(tmp_path / "pred" / cls / "predictions.csv") as f:
            rows.update({row["path"]: row for row in csv.DictReader(f)})
    assert set(rows) == {s.image for s in held_out}
    right = 0
    for s in held_out:
        row = rows[s.image]
        t = cal["classes"].get(s.cls, cal["image_threshold"])
        assert row["class"] == s.cls and (row["decision"] == "anomalous") == (float(row["score"]) >= t)
        assert (float(row["normalised_score"]) >= 0.5) == (row["decision"] == "anomalous")
        right += (row["decision"] == "anomalous") == bool(s.label)
    print(f"decision accuracy on the held-out half: {right}/{len(held_out)}")  # shown with pytest -s
    assert right / len(held_out) > 0.5
    assert f"{sum(r['decision'] == 'anomalous' for r in rows.values() if r['class'] == 'tiles')} anomalous" in r.stdout
    r = run_cli("--ckpt", path, "--images", b, "--classes", "tilez", "--out", tmp_path / "none")
    assert r.returncode == 2 and "calibrated: fabric, tiles" in r.stderr and not (tmp_path / "none").exists()

    lo, hi = cal["heat_range"]  # one fixed scale: what the heat maps colour
    heat = {0: [], 1: []}
    for s in held_out:
        amap, _ = model.predict(data.load_image(s.image, GEOMETRY)[None])
        heat[s.label].append(float(((amap - lo) / (hi - lo)).clamp(0, 1).mean()))
    assert np.mean(heat[0]) < np.mean(heat[1]), heat


def test_export_onnx_round_trip_matches_pytorch(ckpt, model, demo, tmp_path):
    """The whole scoring path of a calibrated checkpoint as ONNX, dynamic batch: onnxruntime's maps, scores and
    normalised scores against PyTorch at batch 1 and 3, the maps within 1e-4 of their maximum."""
    import onnxruntime  # an optional extra for users; CI installs it, so this test never skips there

    images = sorted(Path(demo, "tiles", "test").rglob("*.png"))[:3]
    x = torch.stack([data.load_image(p, GEOMETRY) for p in images])
    cal = dict(image_threshold=float(model.predict(x)[1][1]), score_range=[0.0, 1.0], pixel_threshold=0.5,
               heat_range=[0.0, 1.0], classes={})
    notes = []  # an incomplete calibration (hand-edited, say) is ignored with a note, never a traceback
    hand_edited = dict(calibration={"image_threshold": 0.1})
    assert line.decisions.read_calibration(hand_edited, "x", notes.append) is None
    assert "unreadable calibration metadata" in notes[0]
    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    predict.write_calibration(path, cal)
    r = run_cli("--ckpt", path, "--export", tmp_path / "model.onnx", "--export-input", "normalised", "--images",
                *images[:2])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max |onnx - torch| / max |torch|: anomaly_map" in r.stdout
    assert f"wrote {tmp_path / 'model.onnx'}" in r.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score", "normalised_score", "decision"]
    for b in (1, 3):
        want_maps, want_scores = model.predict(x[:b])
        maps, scores, normalised, _ = session.run(None, {"image": x[:b].numpy()})
        assert maps.shape == (b, 256, 256) and scores.shape == (b,)
        assert np.abs(maps - want_maps.numpy()).max() <= 1e-4 * float(want_maps.abs().max())
        assert np.abs(scores - want_scores.numpy()).max() <= 1e-4 * float(want_scores.abs().max())
        assert normalised == pytest.approx([line.decisions.decide(float(s), cal)["normalised"] for s in scores], abs=1e-6)
    assert normalised[1] == pytest.approx(0.5, abs=1e-6)  # the threshold


def test_a_score_exactly_at_the_threshold_is_anomalous_in_python_and_in_the_graph(tmp_path):
    """The rule "anomalous at or above the threshold", at the threshold and one float32 step either side: in
    line.decisions.decide, in the graphs' DecisionOutputs, and in that module exported to ONNX."""
    import onnxruntime

    t = np.float32(0.375)
    cal = dict(image_threshold=float(t), pixel_threshold=0.5, score_range=[0.0, 1.0], heat_range=[0.0, 1.0],
               classes={})
    scores = np.array([np.nextafter(t, np.float32(-1)), t, np.nextafter(t, np.float32(2))], np.float32)
    want = [False, True, True]
    assert [line.decisions.decide(float(s), cal)["decision"] == "anomalous" for s in scores] == want
    graph = predict.DecisionOutputs(cal)
    maps = torch.zeros(3, 4, 4)
    assert graph(maps, torch.from_numpy(scores))[3].tolist() == want
    onnx_path = tmp_path / "decision.onnx"
    torch.onnx.export(graph, (maps, torch.from_numpy(scores)), onnx_path, dynamo=True, external_data=False,
                      input_names=["maps", "scores"], output_names=["anomaly_map", "score", "normalised", "decision"])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    decision = session.run(None, {"maps": maps.numpy(), "scores": scores})[3]
    assert decision.tolist() == want


def test_export_without_the_onnx_extras_says_what_to_install(ckpt, tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None; import predict, train; "
            f"train.guard(lambda: predict.main(['--ckpt', {str(ckpt)!r}, '--export', {str(tmp_path / 'm.onnx')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip install onnx onnxscript onnxruntime" in r.stderr
    assert not list(tmp_path.iterdir())


def test_calibration_rules_with_and_without_anomalies():
    """F1-max thresholds where anomalies are labelled; from normal images alone, mean + 3 std of the normal
    image scores and pixels; the heat scale from the median normal pixel, the pixel threshold half way."""
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 32, 32), bool)
    masks[3:, 8:16, 8:16] = True
    maps = rng.uniform(0.1, 0.3, masks.shape) + 0.5 * masks
    labels, scores = np.array([0, 0, 0, 1, 1, 1]), np.array([0.2, 0.25, 0.3, 0.28, 0.6, 0.7])
    hist = metrics.PixelHistogram()
    hist.update(masks, maps)
    cal = predict.calibration(labels, scores, hist)
    assert cal["rule"] == {"image": "f1-max", "pixel": "f1-max"}
    assert cal["image_threshold"] == metrics.f1_threshold(labels, scores)[1] == 0.28
    assert abs(cal["pixel_threshold"] - metrics.f1_threshold(masks.ravel(), maps.ravel())[1]) <= hist.resolution
    lo, hi = cal["heat_range"]
    assert lo == pytest.approx(np.median(maps[~masks]), abs=hist.resolution)
    assert (lo + hi) / 2 == pytest.approx(cal["pixel_threshold"])
    assert line.decisions.decide(0.28, cal)["normalised"] == 0.5 and line.decisions.decide(0.27, cal)["decision"] == "normal"

    normal = metrics.PixelHistogram()
    normal.update(masks[:3], maps[:3])
    cal = predict.calibration(labels[:3], scores[:3], normal)
    assert cal["rule"] == {"image": "normal mean + 3 std", "pixel": "normal mean + 3 std"}
    assert cal["image_threshold"] == pytest.approx(scores[:3].mean() + 3 * scores[:3].std())
    assert cal["pixel_threshold"] == pytest.approx(maps[:3].mean() + 3 * maps[:3].std(), abs=1e-4)


def calibrated_copy(ckpt, folder, **rule):
    """A copy of the checkpoint with a hand-made calibration: image threshold, per-class thresholds."""
    path = folder / "model.safetensors"
    shutil.copy(ckpt, path)
    cal = dict(image_threshold=0.5, score_range=[0.0, 1.0], pixel_threshold=0.5, heat_range=[0.0, 1.0], classes={})
    cal.update(rule)
    predict.write_calibration(path, cal)
    return path


def test_a_path_component_named_like_a_class_does_not_change_a_decision(ckpt, model, demo, tmp_path):
    """The same image under .../tiles/... and elsewhere gets the pooled threshold both times; only --classes
    picks a class's own threshold."""
    image = Path(demo, "tiles", "test", "good", "000.png")
    score = float(model.predict(data.load_image(image, GEOMETRY)[None])[1][0])
    # thresholds placed so that the pooled and the class rule disagree on this image
    path = calibrated_copy(ckpt, tmp_path, image_threshold=score + 1.0, classes={"tiles": score - 1.0})
    for folder in ("plain", "tiles"):
        (tmp_path / "line" / folder).mkdir(parents=True)
        shutil.copy(image, tmp_path / "line" / folder / "000.png")
    r = run_cli("--ckpt", path, "--images", tmp_path / "line", "--out", tmp_path / "pred", "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(row["path"]).parent.name for row in rows] == ["plain", "tiles"]
    assert all(row["decision"] == "normal" and row["class"] == "" for row in rows), rows  # the pooled threshold
    r = run_cli("--ckpt", path, "--images", tmp_path / "line", "--classes", "tiles", "--out", tmp_path / "named",
                "--workers", 0)
    with open(tmp_path / "named" / "predictions.csv") as f:
        assert all(row["decision"] == "anomalous" and row["class"] == "tiles" for row in csv.DictReader(f))
    assert "class tiles threshold" in r.stdout


def test_calibrate_the_authors_pth_writes_a_calibrated_twin(demo, tmp_path):
    pth = tmp_path / "official" / "model.pth"
    pth.parent.mkdir()
    torch.save(load_file(shared(*TINY, "inpformer_official.safetensors")), pth)
    before = pth.read_bytes()
    argv = ["--ckpt", str(pth), "--data", "folder", "--data-root", demo, "--classes", "tiles",
            "--image-size", str(IMAGE), "--crop-size", str(CROP), "--workers", "0", "--calibrate"]
    predict.main(argv)
    assert pth.read_bytes() == before  # the authors' file as it was
    with pytest.raises(ValueError, match="exists; calibrate that file instead"):  # before scoring anything
        predict.main(argv)
    twin = pth.with_suffix(".safetensors")
    meta = inpformer.read_checkpoint_metadata(twin)
    assert meta["calibration"]["classes"].keys() == {"tiles"} and meta["data"] == "folder" and meta["data_root"] == demo
    assert inpformer.load_model(twin).config.geometry == GEOMETRY.to_dict()  # the sizes it was calibrated at
    want, got = torch.load(pth), load_file(twin)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_calibrate_a_single_class_run_folder_model_by_model(model, demo, tmp_path, capsys):
    run = tmp_path / "single"
    for cls in ("fabric", "tiles"):
        (run / cls).mkdir(parents=True)
        inpformer.save_checkpoint(model, run / cls / "model.safetensors",
                                  dict(data="folder", data_root=demo, classes=[cls], setting="single"))
    predict.main(["--ckpt", str(run), "--workers", "0", "--batch-size", str(BATCH), "--calibrate"])
    for cls in ("fabric", "tiles"):  # each model calibrated on its own class alone
        cal = inpformer.read_checkpoint_metadata(run / cls / "model.safetensors")["calibration"]
        ds = data.test_set("folder", demo, cls, GEOMETRY)
        labels = torch.tensor([s.label for s in ds.samples])
        scores = model.predict(torch.stack([ds[i]["image"] for i in range(len(ds))]))[1]
        assert list(cal["classes"]) == [cls]
        assert cal["image_threshold"] == pytest.approx(metrics.f1_threshold(labels, scores)[1], abs=1e-6)
    assert capsys.readouterr().out.count("calibrated ") == 2


def test_inpformer_py_alone_scores_a_train_py_checkpoint_as_predict_does(demo, tmp_path):
    """Copied alone into an empty folder, inpformer.py loads a checkpoint that train.py wrote, reads from it the
    geometry and protocol it needs, and scores a preprocessed image to the score predict.py --images writes."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "folder", "--data-root", demo,
                        "--weights", shared(*TINY, "backbone_hub.safetensors"), "--image-size", "126",
                        "--crop-size", "98", "--batch-size", "4", "--iters", "3", "--workers", "0", "--no-eval",
                        "--out", out], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    image = Path(demo, "tiles", "test", "spot", "000.png")
    r = run_cli("--ckpt", out / "model.safetensors", "--images", image, "--out", tmp_path / "pred", "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "pred" / "predictions.csv") as f:
        [row] = list(csv.DictReader(f))

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "inpformer.py", alone)
    geometry = data.geometry_of(inpformer.load_model(out / "model.safetensors").config.geometry)
    from safetensors.torch import save_file
    save_file({"x": data.load_image(image, geometry)[None]}, alone / "x.safetensors")
    script = f"""
import sys
sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
import inpformer
from safetensors.torch import load_file
assert inpformer.__file__.startswith({str(alone)!r}), inpformer.__file__
model = inpformer.load_model({str(out / 'model.safetensors')!r})
g = model.config.geometry
x = load_file("x.safetensors")["x"]
assert g == dict(image_size=[126, 126], crop_size=[98, 98]) and list(x.shape[-2:]) == g["crop_size"]
maps, scores = model.predict(x, out_size=inpformer.MAP_SIZE, max_ratio=inpformer.MAX_RATIO)
print(repr(float(scores[0])))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=alone,
                       env=dict(os.environ, PYTHONPATH=str(alone)))
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout) - float(row["score"])) <= 1e-6 * max(1.0, abs(float(row["score"])))
    assert sys.modules["inpformer"].__file__ == str(ROOT / "inpformer.py")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "junk.pth").write_bytes(b"\x80\x04junk")
    return d


@pytest.mark.parametrize("argv, words", [
    (["--images", "/nonexistent/img.png"], ["/nonexistent/img.png"]),
    (["--export", "{bad}/junk.pth"], ["{bad}/junk.pth", "exists"]),  # never replaced
    (["--calibrate", "--zero-shot"], ["--calibrate", "--zero-shot"]),
    (["--export", "{bad}/new.onnx", "--calibrate"], ["--calibrate", "--export"]),
    (["--images", "{bad}", "--heat-range", "0.5", "0.1"], ["--heat-range 0.5 0.1"]),
    (["--calibrate", "--images", "{bad}"], ["--calibrate", "--images"]),
    ([], ["--calibrate", "--images", "--export"]),
    (["--images", "{bad}", "--classes", "a,b"], ["--classes a,b", "one class"]),
    (["--calibrate", "--data", "folder", "--data-root", "/nonexistent/root"], ["/nonexistent/root"]),
    (["--images", "{bad}", "--precision", "fp16", "--device", "cpu"], ["fp16", "CUDA"]),
    (["--save-maps", "2"], ["--save-maps"]),  # evaluate.py's, not the line's
])
def test_bad_input_fails_with_one_line(argv, words, ckpt, bad, tmp_path, capsys):
    argv = ["--ckpt", str(ckpt)] + [a.format(bad=bad) for a in argv] + ["--workers", "0", "--out", str(tmp_path / "o")]
    expect_one_line_error(capsys, lambda: predict.main(argv), *(w.format(bad=bad) for w in words))
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------------------------------
# Decisions a line can act on (issue 25)


@pytest.mark.parametrize("seed", range(5))
def test_the_false_reject_threshold_is_the_conformal_quantile(seed):
    """Against a brute-force search, in exact arithmetic: the smallest k whose conformal bound on a new good
    part's rejection, (n + 1 - k) / (n + 1), is within the budget; the threshold sits just above the k-th
    smallest good score, so "score >= threshold" rejects exactly the scores above it (ties included)."""
    from fractions import Fraction

    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    good = np.round(rng.normal(0.3, 0.05, n), 3).astype(np.float32)  # float32 as the model's scores; ties
    ordered = np.sort(good)
    for p in (0.01, 0.05, 0.1, 0.3):
        if n < 1 / p - 1:
            continue
        t = predict.false_reject_threshold(good, p)
        k = min(k for k in range(1, n + 1) if Fraction(n + 1 - k, n + 1) <= Fraction(str(p)))
        assert t == np.nextafter(ordered[k - 1], np.float32(np.inf))  # the next float32: exact in both paths
        assert np.sum(good >= t) == np.sum(good > ordered[k - 1]) <= n - k
        # the guarantee, checked by simulation: a new good part from the same distribution is rejected <= p
        if seed == 0 and p == 0.1:
            trials = [predict.false_reject_threshold(rng.normal(0, 1, 29), p) for _ in range(4000)]
            rejected = np.mean([rng.normal(0, 1) >= t for t in trials])
            assert rejected <= p + 0.015, rejected


def test_too_few_good_images_names_the_smallest_budget_they_support():
    with pytest.raises(ValueError, match=r"--max-false-reject 0.01: 49 good images support a budget of at least "
                                         r"0.02 \(1 / \(n \+ 1\)\).*at least 99"):
        predict.false_reject_threshold(np.arange(49.0), 0.01)
    assert predict.false_reject_threshold(np.arange(99.0), 0.01) == np.nextafter(np.float32(98), np.float32(np.inf))


def test_regions_of_a_map_against_a_hand_made_mask():
    amap = np.zeros((40, 60), np.float32)
    amap[5:10, 5:15] = 0.9          # 50 px
    amap[20, 30] = amap[21, 31] = 0.7  # corner-touching: one region of 2 px
    amap[30:38, 50:52] = 0.6        # 16 px
    mask, regions = predict.find_regions(amap, 0.5)
    assert [(r.area, r.box) for r in regions] == [(50, (5, 5, 15, 10)), (2, (30, 20, 32, 22)), (16, (50, 30, 52, 38))]
    assert regions[0].max_score == pytest.approx(0.9) and regions[2].mean_score == pytest.approx(0.6)
    assert np.array_equal(mask, amap >= 0.5)
    mask, regions = predict.find_regions(amap, 0.5, min_area=10)
    assert [r.area for r in regions] == [50, 16] and [r.id for r in regions] == [1, 2] and mask.sum() == 66


def test_budget_calibration_regions_and_the_region_rule_through_the_command_line(ckpt, demo, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    r = run_cli("--ckpt", path, "--calibrate", "--max-false-reject", 0.2, "--max-false-pixels", 0.02, "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    cal = inpformer.read_checkpoint_metadata(path)["calibration"]
    model = inpformer.load_model(path)
    good, bad = {}, {}
    for cls in ("fabric", "tiles"):
        ds = data.test_set("folder", demo, cls, GEOMETRY)
        scores = model.predict(torch.stack([ds[i]["image"] for i in range(len(ds))]))[1].numpy()
        labels = np.array([s.label for s in ds.samples], bool)
        good[cls], bad[cls] = scores[~labels], scores[labels]
    pooled = np.concatenate(list(good.values()))
    assert cal["image_threshold"] == pytest.approx(predict.false_reject_threshold(pooled, 0.2))
    for cls in ("fabric", "tiles"):  # 4 good images a class support a budget of 0.2
        assert cal["classes"][cls] == pytest.approx(predict.false_reject_threshold(good[cls], 0.2))
        assert cal["miss_rate"]["classes"][cls] == pytest.approx(np.mean(bad[cls] < cal["classes"][cls]))
    assert cal["rule"]["image"] == "false-reject budget 0.2 (conformal)" and "labelled defects missed" in r.stdout
    good_pixels = [model.predict(data.test_set("folder", demo, c, GEOMETRY)[i]["image"][None])[0]
                   for c in ("fabric", "tiles") for i in range(4)]  # the first four of each class are the good ones
    flagged = float(torch.mean((torch.cat(good_pixels) >= cal["pixel_threshold"]).float()))
    assert flagged <= 0.02 and flagged > 0.015  # the budget, up to the histogram's resolution
    # --images: regions, masks and the region rule
    r = run_cli("--ckpt", path, "--images", f"{demo}/tiles/test", f"{demo}/fabric/test", "--min-area", 20,
                "--save-masks", "--decide-by", "regions", "--out", tmp_path / "pred", "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "pred" / "regions.csv") as f:
        regions = list(csv.DictReader(f))
    for row in rows:
        mine = [g for g in regions if g["image"] == row["path"]]
        assert int(row["regions"]) == len(mine) and all(int(g["area"]) >= 20 for g in mine)
        assert row["decision"] == ("anomalous" if mine else "normal")
        with Image.open(tmp_path / "pred" / "masks" / row["heatmap"]) as m, Image.open(row["path"]) as im:
            assert m.size == im.size and int((np.asarray(m) > 0).sum()) == sum(int(g["area"]) for g in mine)
        amap = predict.native_map(model.predict(data.load_image(row["path"], GEOMETRY)[None])[0][0], row["path"],
                                  GEOMETRY)
        assert len(predict.find_regions(amap, cal["pixel_threshold"], 20)[1]) == len(mine)
    assert any(int(r["regions"]) for r in rows)


def test_calibrating_on_training_images_warns_and_too_few_images_refuse(ckpt, demo, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    r = run_cli("--ckpt", path, "--calibrate", "--images", f"{demo}/tiles/train/good", "--classes", "tiles",
                "--max-false-reject", 0.2, "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: 8 of the calibration images are training images" in r.stdout
    assert list(inpformer.read_checkpoint_metadata(path)["calibration"]["classes"]) == ["tiles"]
    r = run_cli("--ckpt", path, "--calibrate", "--images", f"{demo}/tiles/train/good", "--max-false-reject", 0.01)
    assert r.returncode == 2 and "support a budget of at least 0.1111" in r.stderr and r.stderr.count("\n") == 1


def test_the_exported_graph_fed_raw_frames_decides_as_predict_does(ckpt, demo, tmp_path):
    """Raw uint8 frames in: the graph's scores within 1 % of predict.py --images on the same files, the same
    decisions on at least 98 % of them, and normalised_score and decision equal to predictions.csv's for the
    class named at export."""
    import onnxruntime

    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    assert run_cli("--ckpt", path, "--calibrate", "--workers", 0).returncode == 0
    r = run_cli("--ckpt", path, "--export", tmp_path / "line.onnx", "--classes", "tiles", "--images",
                f"{demo}/tiles/test/spot")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the graph's scores against the Python path's" in r.stdout
    r = run_cli("--ckpt", path, "--images", f"{demo}/tiles/test", "--classes", "tiles", "--out", tmp_path / "pred",
                "--workers", 0)
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    session = onnxruntime.InferenceSession(str(tmp_path / "line.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["frames"]
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score", "normalised_score", "decision"]
    agree = 0
    for row in rows:
        maps, score, normalised, decision = session.run(None, {"frames": predict.raw_frame(row["path"])[None]})
        want = float(row["score"])
        assert abs(float(score[0]) - want) <= 0.01 * abs(want), row["path"]
        assert maps.shape == (1, 256, 256) and decision.dtype == bool
        cal = inpformer.read_checkpoint_metadata(path)["calibration"]
        assert float(normalised[0]) == pytest.approx(line.decisions.normalise(float(score[0]), cal, cal["classes"]["tiles"]),
                                                     abs=1e-6)
        agree += bool(decision[0]) == (row["decision"] == "anomalous")
    assert agree >= 0.98 * len(rows)


@pytest.mark.parametrize("flags, frame", [
    (["--image-size", "112x168", "--crop-size", "none"], (150, 200)),                    # the whole frame
    (["--image-size", "native", "--tile", "56", "--frame-size", "112x56"], (112, 56)),  # 2 tiles, one above the other
])
def test_whole_frame_and_tiled_geometries_export(ckpt, demo, tmp_path, flags, frame):
    """Each geometry exports from raw frames and its graph scores as the Python path does on them."""
    import onnxruntime

    image = Path(demo, "tiles", "test", "spot", "000.png")
    out = tmp_path / "g.onnx"
    r = run_cli("--ckpt", ckpt, "--export", out, *flags, "--images", image)
    assert r.returncode == 0, r.stdout + r.stderr
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    frames = np.stack([predict.raw_frame(image, frame), predict.raw_frame(image, frame)[:, ::-1]])
    _, scores = session.run(None, {"frames": np.ascontiguousarray(frames)})
    args = predict.parse_args(["--ckpt", str(ckpt), "--export", str(out), *flags])
    model = inpformer.load_model(ckpt)
    geometry = train.geometry(args, data.geometry_of(model.config.geometry))
    for f, got in zip(frames, scores):
        x = data.load_image(Image.fromarray(np.ascontiguousarray(f)), geometry)
        want = float(line.frames.predict_frames(model, [x] if geometry.tile else x[None], geometry)[1][0])
        assert abs(float(got) - want) <= 0.01 * abs(want)


def test_tiles_at_each_frames_own_size_need_a_frame_size_to_export(ckpt, tmp_path, capsys):
    expect_one_line_error(capsys, lambda: predict.main(["--ckpt", str(ckpt), "--export", str(tmp_path / "t.onnx"),
                                                        "--image-size", "native", "--tile", "56"]), "--frame-size")
    assert not (tmp_path / "t.onnx").exists()


def test_calibrating_class_b_after_a_keeps_a_and_the_pooled_rule_bit_for_bit(ckpt, demo, tmp_path):
    """--calibrate --classes tiles on a calibrated model: tiles takes thresholds learnt on its own images, fabric
    and the pooled thresholds stay bit for bit, and the rule records how each class was calibrated. The line's
    case: good parts of one class, a false-reject budget, one class at a time."""
    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    assert run_cli("--ckpt", path, "--calibrate", "--workers", 0).returncode == 0
    first = inpformer.read_checkpoint_metadata(path)["calibration"]
    assert first["class_rules"]["fabric"]["images"] == 10 and first["class_rules"]["fabric"]["anomalous"] == 6
    r = run_cli("--ckpt", path, "--calibrate", "--classes", "tiles", "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    cal = inpformer.read_checkpoint_metadata(path)["calibration"]
    assert cal["classes"]["fabric"] == first["classes"]["fabric"]
    for key in ("image_threshold", "pixel_threshold", "score_range", "heat_range", "rule"):
        assert cal[key] == first[key], key
    assert cal["class_rules"]["fabric"] == first["class_rules"]["fabric"]
    model = inpformer.load_model(path)
    ds = data.test_set("folder", demo, "tiles", GEOMETRY)
    labels = torch.tensor([s.label for s in ds.samples])
    maps, scores = model.predict(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    assert cal["classes"]["tiles"] == pytest.approx(metrics.f1_threshold(labels, scores)[1], abs=1e-6)
    own = line.decisions.class_rule(cal, "tiles")
    assert own["score_range"] == pytest.approx([float(scores.min()), float(scores.max())], abs=1e-6)
    assert own["pixel_threshold"] != first["pixel_threshold"]
    assert line.decisions.class_rule(cal, "fabric")["pixel_threshold"] == first["pixel_threshold"]
    record = cal["class_rules"]["tiles"]
    assert record["images"] == 10 and record["rule"] == {"image": "f1-max", "pixel": "f1-max"} and record["when"]
    assert "replaced tiles image threshold" in r.stdout and f"kept fabric {first['classes']['fabric']:.4g}" in r.stdout

    # good parts of tiles alone, under a budget: tiles replaced again, fabric still the first calibration's
    r = run_cli("--ckpt", path, "--calibrate", "--images", f"{demo}/tiles/train/good", "--classes", "tiles",
                "--max-false-reject", 0.2, "--workers", 0)
    assert r.returncode == 0, r.stdout + r.stderr
    again = inpformer.read_checkpoint_metadata(path)["calibration"]
    assert again["classes"]["fabric"] == first["classes"]["fabric"]
    assert again["image_threshold"] == first["image_threshold"]
    good = model.predict(torch.stack([data.load_image(p, GEOMETRY)
                                      for p in sorted(Path(demo, "tiles", "train", "good").glob("*.png"))]))[1]
    assert again["classes"]["tiles"] == pytest.approx(predict.false_reject_threshold(good.numpy(), 0.2))
    assert again["class_rules"]["tiles"]["rule"]["image"] == "false-reject budget 0.2 (conformal)"
    assert again["class_names"] == ["fabric", "tiles"]

    # --images decides and finds regions by each class's own thresholds
    r = run_cli("--ckpt", path, "--images", f"{demo}/tiles/test", "--classes", "tiles", "--workers", 0,
                "--out", tmp_path / "pred")
    assert f"class tiles threshold {again['classes']['tiles']:.4g}" in r.stdout
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        want = line.decisions.decide(float(row["score"]), again, "tiles")
        assert row["decision"] == want["decision"]
        assert float(row["normalised_score"]) == pytest.approx(want["normalised"], abs=1e-6)
        amap = predict.native_map(model.predict(data.load_image(row["path"], GEOMETRY)[None])[0][0], row["path"],
                                  GEOMETRY)
        threshold = again["class_rules"]["tiles"]["pixel_threshold"]
        assert int(row["regions"]) == len(predict.find_regions(amap, threshold)[1])


def test_classes_calibrated_at_another_geometry_are_refused(ckpt, tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    assert run_cli("--ckpt", path, "--calibrate", "--workers", 0).returncode == 0
    before = path.read_bytes()
    expect_one_line_error(capsys, lambda: predict.main(["--ckpt", str(path), "--calibrate", "--classes", "tiles",
                                                        "--image-size", "140", "--crop-size", "112"]),
                          "drop --classes")
    assert path.read_bytes() == before
    earlier = inpformer.read_checkpoint_metadata(path)["calibration"]
    defects_only = {"tiles": [data.Sample("a.png", "m.png", 1, "tiles", "spot")]}
    args = predict.parse_args(["--ckpt", str(path), "--calibrate", "--classes", "tiles"])
    with pytest.raises(ValueError, match="class tiles has no good image to calibrate it on its own"):
        predict.check_each_class(path, earlier, defects_only, args)
    r = run_cli("--ckpt", path, "--calibrate", "--classes", "all", "--workers", 0)  # all classes: the whole rule
    assert r.returncode == 0 and "earlier calibration replaced" in r.stdout, r.stdout + r.stderr


def test_a_tiled_models_graph_decides_as_predict_does_at_and_around_the_threshold(ckpt, demo, tmp_path):
    """A tiled geometry (image score: the best tile's) exported from raw frames at the model's frame size: the
    graph's scores equal predict.py --images' within round-off, and with the class's threshold at one image's
    score, predict.py says anomalous at it and the graph agrees with predict.py on every image but where the two
    scores straddle the threshold within that round-off; its normalised score is the class's (its own range)."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for k, p in enumerate(sorted(Path(demo, "tiles", "test").rglob("*.png"))[:6]):
        Image.open(p).convert("RGB").resize((168, 112), Image.BILINEAR).save(frames / f"{k}.png")
    # Two tiles of 112 overlapping by 56 (0.25 asks for at least 28): an export unrolls the tiles, so few keep it quick.
    flags = ["--image-size", "112x168", "--tile", "112", "--tile-overlap", "0.25", "--image-score", "tiles"]
    r = run_cli("--ckpt", ckpt, "--images", frames, "--out", tmp_path / "scores", "--workers", 0, *flags)
    assert r.returncode == 0 and "image scored by its best tile" in r.stdout, r.stdout + r.stderr
    with open(tmp_path / "scores" / "predictions.csv") as f:
        scores = {row["path"]: float(row["score"]) for row in csv.DictReader(f)}
    middle = sorted(scores.values())[3]
    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    predict.write_calibration(path, dict(image_threshold=0.0, pixel_threshold=1.0, score_range=[0.0, 1.0],
                                         heat_range=[0.0, 1.0], classes={"tiles": middle},
                                         class_rules={"tiles": {"score_range": [0.5 * middle, 1.5 * middle]}}))
    r = run_cli("--ckpt", path, "--export", tmp_path / "tiled.onnx", "--classes", "tiles", *flags)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("--ckpt", path, "--images", frames, "--out", tmp_path / "pred", "--workers", 0, "--classes", "tiles",
                *flags)
    at_threshold = 0
    for row, (_, score, normalised, decision) in graph_on_predictions(tmp_path / "tiled.onnx",
                                                                      tmp_path / "pred" / "predictions.csv"):
        want = float(row["score"])
        assert abs(float(score[0]) - want) <= 1e-5 * abs(want), row["path"]
        assert float(normalised[0]) == pytest.approx(float(row["normalised_score"]), abs=1e-4)
        if want == middle:
            at_threshold += 1
            assert row["decision"] == "anomalous"
        if abs(want - middle) > 1e-5 * middle:
            assert bool(decision[0]) == (row["decision"] == "anomalous"), row["path"]
    assert at_threshold == 1
