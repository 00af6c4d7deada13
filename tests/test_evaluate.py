"""evaluate.py: its metrics against metrics.py on maps computed here independently, the official fixture's maps
through evaluate's map path, the zero-shot, streaming, float16 and full-resolution protocols, pictures,
--images, checkpoint defaults, and one-line errors for bad input."""
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import data
import evaluate
import inpformer
import metrics
from conftest import ROOT, shared

IMAGE, CROP, BATCH = 128, 112, 4
DEMO_SIZE = 160  # demo images larger than IMAGE, so that --full-res has a real resize to undo
TINY = "fixtures", "official_tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models here are tiny, so a second intra-op thread gains nothing; and where other jobs share the
    # cores, OpenMP's spinning threads make such small ops 10-50x slower. Restored for the other modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "demo"
    return str(data.make_demo(root, seed=0, n_train=8, n_test_good=4, n_test_defect=6, size=DEMO_SIZE))


@pytest.fixture(scope="module")
def ckpt(demo, tmp_path_factory):
    """A tiny INP-Former (64-wide, one 64-wide head) after a few Adam steps on the demo set, saved as train.py
    saves checkpoints."""
    torch.manual_seed(0)
    vit = inpformer.ViTConfig(embed_dim=64, depth=10, num_heads=1, num_register_tokens=0)
    model = inpformer.INPFormer(inpformer.ViT(vit), inp_num=4, decoder_depth=8)
    train = torch.utils.data.DataLoader(data.train_set("folder", demo, "all", IMAGE, CROP), batch_size=8,
                                        shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        for batch in train:
            loss = model.loss(batch["image"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("run") / "model.safetensors"
    inpformer.save_checkpoint(model.eval(), path, dict(
        data="folder", data_root=demo, classes=data.list_classes("folder", demo), image_size=IMAGE,
        crop_size=CROP, setting="multi", backbone="tiny"))
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return inpformer.load_model(ckpt)


def reference_maps(model, demo, cls, zero_shot=False):
    """Labels, scores, 256x256 masks and maps of one class, written from the official protocol, not from
    evaluate.py: model.predict (or the INP distance of §6.5 by hand), GT nearest to 256 then > 0.5."""
    loader = torch.utils.data.DataLoader(data.test_set("folder", demo, cls, IMAGE, CROP), batch_size=BATCH)
    labels, scores, masks, maps, paths = [], [], [], [], []
    for batch in loader:
        x = batch["image"]
        with torch.no_grad():
            if zero_shot:
                _, fused = model.encode(x)
                d = inpformer.inp_distance(fused, model.extract_inps(fused)).view(len(x), 1, CROP // 14, CROP // 14)
                d = F.interpolate(d, size=(CROP, CROP), mode="bilinear", align_corners=True)
                d = F.interpolate(d, size=(256, 256), mode="bilinear", align_corners=False)
                m = F.conv2d(d, inpformer.gaussian_kernel(5, 4.0), padding=2)[:, 0]
                s = m.flatten(1).topk(655, dim=1).values.mean(dim=1)
            else:
                m, s = model.predict(x)
        labels.append(batch["label"])
        scores.append(s)
        maps.append(m)
        masks.append(F.interpolate(batch["mask"], size=(256, 256), mode="nearest")[:, 0] > 0.5)
        paths += batch["path"]
    return torch.cat(labels), torch.cat(scores), torch.cat(masks), torch.cat(maps), paths


def assert_metrics_equal(got, want, tol=1e-9):
    assert list(got) == list(evaluate.METRICS)
    for k in evaluate.METRICS:
        assert math.isclose(got[k], want[k], rel_tol=0, abs_tol=tol), (k, got[k], want[k])


def run_cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


# -----------------------------------------------------------------------------------------------------
# The command line on a trained checkpoint


def test_ckpt_alone_writes_the_paper_metrics_equal_to_metrics_py_and_pictures(ckpt, model, demo, tmp_path):
    out = tmp_path / "eval"
    r = run_cli("--ckpt", ckpt, "--save-maps", 2, "--out", out, "--workers", 0, "--batch-size", BATCH)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| mean |" in r.stdout and "img/s" in r.stdout

    results = json.loads((out / "metrics.json").read_text())
    classes, pooled = data.list_classes("folder", demo), ([], [])
    assert list(results["classes"]) == classes
    for cls in classes:
        labels, scores, masks, maps, paths = reference_maps(model, demo, cls)
        assert_metrics_equal(results["classes"][cls], metrics.compute_all(labels, scores, masks, maps))
        assert results["counts"][cls] == {"normal": 4, "anomalous": 6}
        t = metrics.compute_all(labels, scores, masks, maps, thresholds=True)
        assert results["thresholds"][cls] == {"image": t["I-threshold"], "pixel": t["P-threshold"]}
        pooled[0].append(labels)
        pooled[1].append(scores)

        # Pictures: title line over image | ground truth | overlay at 256x256 each | colour bar, the most
        # anomalous image first.
        pngs = sorted((out / "maps" / cls).glob("*.png"))
        assert [p.name[:8] for p in pngs] == ["least_01", "least_02", "most_01_", "most_02_"]
        for p in pngs:
            with Image.open(p) as im:
                im.load()
                assert im.size == (3 * 256 + 84, 14 + 256) and im.mode == "RGB"
        top = paths[int(scores.argmax())]
        assert (out / "maps" / cls / f"most_01_{evaluate._file_stem(top)}.png").is_file()
    mean = {k: float(np.mean([results["classes"][c][k] for c in classes])) for k in evaluate.METRICS}
    assert_metrics_equal(results["mean"], mean, tol=1e-12)
    cal = results["calibration"]  # pooled over the classes
    assert cal["image_threshold"] == metrics.f1_threshold(torch.cat(pooled[0]), torch.cat(pooled[1]))[1]
    assert cal["rule"] == {"image": "f1-max", "pixel": "f1-max"} and cal["anomalous_images"] == 12

    with open(out / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", *evaluate.METRICS] and [r[0] for r in rows[1:]] == [*classes, "mean"]
    assert float(rows[1][1]) == results["classes"][classes[0]]["I-AUROC"]
    assert (out / "metrics.md").read_text().strip() == evaluate.markdown_table(results)
    with open(out / "image_scores.csv") as f:
        assert len(list(csv.DictReader(f))) == 20


def test_official_state_dict_maps_match_the_fixture():
    """The official-format tiny model through evaluate's map path: the official map256/score256 tensors."""
    io = load_file(shared(*TINY, "io.safetensors"))
    model = inpformer.load_model(shared(*TINY, "inpformer_official.safetensors"))
    for size in (224, 392):
        maps, scores = evaluate.predict_maps(model, io[f"x_{size}"])
        for name, got, ref in (("map256", maps, io[f"map256_{size}"][:, 0]), ("score256", scores, io[f"score256_{size}"])):
            assert got.shape == ref.shape and got.dtype == torch.float32
            err = (got - ref).abs().max().item()
            assert err <= 1e-4 * ref.abs().max().item(), f"{name}_{size}: max|diff| {err:.3g}"


def test_official_pth_evaluates_with_data_arguments(demo, tmp_path, capsys):
    pth = tmp_path / "official" / "model.pth"
    pth.parent.mkdir()
    torch.save(load_file(shared(*TINY, "inpformer_official.safetensors")), pth)
    evaluate.main(["--ckpt", str(pth), "--data", "folder", "--data-root", demo, "--classes", "tiles",
                   "--image-size", str(IMAGE), "--crop-size", str(CROP), "--workers", "0"])
    results = json.loads((tmp_path / "official" / "eval" / "metrics.json").read_text())
    assert list(results["classes"]) == ["tiles"]
    assert all(math.isfinite(v) for v in results["classes"]["tiles"].values())
    assert results["protocol"]["crop_size"] == CROP
    assert "| tiles |" in capsys.readouterr().out
    # --calibrate leaves the authors' file as it is and writes a calibrated project checkpoint beside it
    before = pth.read_bytes()
    evaluate.main(["--ckpt", str(pth), "--data", "folder", "--data-root", demo, "--classes", "tiles",
                   "--image-size", str(IMAGE), "--crop-size", str(CROP), "--workers", "0", "--calibrate"])
    assert pth.read_bytes() == before
    with pytest.raises(ValueError, match="exists; calibrate that file instead"):  # before evaluating anything
        evaluate.main(["--ckpt", str(pth), "--data", "folder", "--data-root", demo, "--calibrate"])
    meta = inpformer.read_checkpoint_metadata(pth.with_suffix(".safetensors"))
    assert meta["calibration"]["classes"].keys() == {"tiles"} and (meta["image_size"], meta["crop_size"]) == (IMAGE, CROP)
    want, got = torch.load(pth), load_file(pth.with_suffix(".safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)


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
    x = torch.stack([data.load_image(row["path"], IMAGE, CROP) for row in rows])
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
    r = run_cli("--ckpt", path, "--data-root", a, "--calibrate", "--workers", 0, "--out", tmp_path / "eval")
    assert r.returncode == 0, r.stdout + r.stderr
    after, meta = load_file(path), inpformer.read_checkpoint_metadata(path)
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    cal = meta.pop("calibration")
    assert meta == meta_before and cal["rule"] == {"image": "f1-max", "pixel": "f1-max"}
    assert cal == json.loads((tmp_path / "eval" / "metrics.json").read_text())["calibration"]

    r = run_cli("--ckpt", path, "--images", b / "fabric" / "test", b / "tiles" / "test", "--workers", 0,
                "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
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
    assert f"{sum(r['decision'] == 'anomalous' for r in rows.values())} anomalous" in r.stdout
    r = run_cli("--ckpt", path, "--images", b, "--classes", "tilez", "--out", tmp_path / "none")
    assert r.returncode == 2 and "calibrated: fabric, tiles" in r.stderr and not (tmp_path / "none").exists()

    model = inpformer.load_model(path)  # one fixed scale: what the heat maps colour
    lo, hi = cal["heat_range"]
    heat = {0: [], 1: []}
    for s in held_out:
        amap, _ = model.predict(data.load_image(s.image, IMAGE, CROP)[None])
        heat[s.label].append(float(((amap - lo) / (hi - lo)).clamp(0, 1).mean()))
    assert np.mean(heat[0]) < np.mean(heat[1]), heat


def test_single_class_run_folder_gives_one_table(ckpt, model, demo, tmp_path, capsys):
    run = tmp_path / "single"
    meta = inpformer.read_checkpoint_metadata(ckpt)
    for cls in ("fabric", "tiles"):
        (run / cls).mkdir(parents=True)
        inpformer.save_checkpoint(model, run / cls / "model.safetensors",
                                  dict(data="folder", data_root=demo, classes=[cls], image_size=IMAGE,
                                       crop_size=CROP, setting="single", backbone=meta["backbone"]))
    evaluate.main(["--ckpt", str(run), "--workers", "0", "--batch-size", str(BATCH), "--calibrate", "--classes", "all"])
    results = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(results["classes"]) == ["fabric", "tiles"]
    for cls in ("fabric", "tiles"):  # each model calibrated on its own class
        cal = inpformer.read_checkpoint_metadata(run / cls / "model.safetensors")["calibration"]
        assert list(cal["classes"]) == [cls] and cal["image_threshold"] == results["thresholds"][cls]["image"]
    labels, scores, masks, maps, _ = reference_maps(model, demo, "tiles")
    assert_metrics_equal(results["classes"]["tiles"], metrics.compute_all(labels, scores, masks, maps))
    assert (run / "eval" / "fabric" / "metrics.json").is_file()
    assert "| mean |" in capsys.readouterr().out


def test_other_data_set_notes_zero_shot_and_writes_apart(ckpt, demo, tmp_path, capsys):
    # A copy of a demo class in MVTec layout stands in for "another data set than the checkpoint's".
    shutil.copytree(f"{demo}/tiles", tmp_path / "other" / "tiles")
    evaluate.main(["--ckpt", str(ckpt), "--data", "mvtec", "--data-root", str(tmp_path / "other"), "--workers", "0"])
    assert "add --zero-shot" in capsys.readouterr().out
    results = json.loads((ckpt.parent / "eval-mvtec" / "metrics.json").read_text())
    assert list(results["classes"]) == ["tiles"]  # all classes of the other set, not the checkpoint's list
    # The same folder under another data-set name is the checkpoint's own data: no note, the usual folder.
    evaluate.main(["--ckpt", str(ckpt), "--data", "mvtec", "--data-root", demo, "--classes", "tiles",
                   "--workers", "0", "--out", str(tmp_path / "same")])
    assert "add --zero-shot" not in capsys.readouterr().out


# -----------------------------------------------------------------------------------------------------
# Protocols, through evaluate()


def test_zero_shot_maps_are_the_inp_distance(model, demo):
    got = evaluate.evaluate(model, "folder", demo, ["tiles"], evaluate.Options(IMAGE, CROP, BATCH, zero_shot=True),
                            log=lambda m: None)
    labels, scores, masks, maps, _ = reference_maps(model, demo, "tiles", zero_shot=True)
    assert_metrics_equal(got["classes"]["tiles"], metrics.compute_all(labels, scores, masks, maps), tol=1e-6)
    assert got["protocol"]["maps"] == "inp-distance"


def test_zero_shot_pictures_show_the_inp_distance(model, demo, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "predict", lambda *a, **k: calls.append("reconstruction"))
    evaluate.evaluate(model, "folder", demo, "tiles", evaluate.Options(IMAGE, CROP, BATCH, zero_shot=True,
                                                                       save_maps=1), out_dir=tmp_path)
    assert not calls and len(list((tmp_path / "maps" / "tiles").glob("*.png"))) == 2


def test_streaming_is_within_its_error_bounds_and_float16_is_opt_in(model, demo):
    quiet = dict(log=lambda m: None)
    opts = evaluate.Options(IMAGE, CROP, BATCH)
    exact = evaluate.evaluate(model, "folder", demo, "all", opts, **quiet)
    stream = evaluate.evaluate(model, "folder", demo, "all", dataclasses.replace(opts, streaming=True), **quiet)
    for cls, m in exact["classes"].items():
        s, bound = stream["classes"][cls], stream["error_bounds"][cls]
        for k in ("I-AUROC", "I-AP", "I-F1max"):
            assert s[k] == m[k]
        for k in ("P-AUROC", "P-AP", "P-F1max", "AUPRO"):
            assert abs(s[k] - m[k]) <= bound[k] + 1e-12, (cls, k)
    half = evaluate.evaluate(model, "folder", demo, ["tiles"], dataclasses.replace(opts, map_dtype="float16"), **quiet)
    labels, scores, masks, maps, _ = reference_maps(model, demo, "tiles")
    assert_metrics_equal(half["classes"]["tiles"], metrics.compute_all(labels, scores, masks, maps.half()))


def test_full_res_scores_the_crop_region_at_original_resolution(model, demo):
    got = evaluate.evaluate(model, "folder", demo, ["fabric"], evaluate.Options(IMAGE, CROP, BATCH, full_res=True),
                            log=lambda m: None)
    labels, scores, _, maps, paths = reference_maps(model, demo, "fabric")
    lo, hi = round(8 * DEMO_SIZE / IMAGE), round(120 * DEMO_SIZE / IMAGE)  # crop offset 8 and 8 + 112 at 128 px
    assert (lo, hi) == (10, 150)
    big = F.interpolate(maps[:, None], size=(hi - lo, hi - lo), mode="bilinear", align_corners=False)[:, 0]
    masks = []
    for p in paths:
        stem = p.rsplit("/", 1)[1][:-4]
        defect = p.rsplit("/", 2)[1]
        if defect == "good":
            masks.append(np.zeros((hi - lo, hi - lo), bool))
        else:
            with Image.open(f"{demo}/fabric/ground_truth/{defect}/{stem}_mask.png") as m:
                masks.append(np.asarray(m)[lo:hi, lo:hi] > 127)
    want = metrics.compute_all(labels, scores, np.stack(masks), big)
    assert_metrics_equal(got["classes"]["fabric"], want, tol=1e-6)
    assert got["protocol"]["pixels"] == "original"


def test_exact_metrics_need_one_map_size_per_class_streaming_does_not():
    maps = [torch.rand(30, 40), torch.rand(30, 50)]
    masks = [m > 0.9 for m in maps]
    with pytest.raises(ValueError, match="--streaming"):
        evaluate.ClassScores(2).add(torch.tensor([1, 1]), torch.rand(2), masks, maps)
    acc = evaluate.ClassScores(2, streaming=True)
    acc.add(torch.tensor([0, 1]), torch.tensor([0.1, 0.2]), masks, maps)
    assert acc.compute()["I-AUROC"] == 1.0


def test_markdown_table_is_the_papers_layout():
    m = dict(zip(evaluate.METRICS, [0.9974, 0.5, 1.0, float("nan"), 0.25, 0.123, 0.0]))
    table = evaluate.markdown_table({"classes": {"a": m}, "mean": m}).splitlines()
    assert table[0] == "| class | I-AUROC | I-AP | I-F1max | P-AUROC | P-AP | P-F1max | AUPRO |"
    assert table[2] == "| a | 99.7 | 50.0 | 100.0 | n/a | 25.0 | 12.3 | 0.0 |"
    assert table[3].startswith("| mean | 99.7 |")


# -----------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2


@pytest.fixture(scope="module")
def bad_files(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "junk.safetensors").write_bytes(b"this is no checkpoint")
    (d / "junk.pth").write_bytes(b"\x80\x04junk")
    blob = ckpt.read_bytes()
    (d / "truncated.safetensors").write_bytes(blob[: len(blob) * 3 // 4])
    moved = d / "moved.safetensors"  # trained on data that is no longer where it was
    model = inpformer.load_model(ckpt)
    inpformer.save_checkpoint(model, moved, dict(data="folder", data_root=str(d / "gone"), classes=["tiles"],
                                                 image_size=IMAGE, crop_size=CROP))
    return d


@pytest.mark.parametrize("argv, words", [
    (["--ckpt", "{bad}/junk.safetensors"], ["{bad}/junk.safetensors"]),
    (["--ckpt", "{bad}/junk.pth"], ["{bad}/junk.pth"]),
    (["--ckpt", "{bad}/truncated.safetensors"], ["{bad}/truncated.safetensors"]),
    (["--ckpt", "{bad}/missing.safetensors"], ["{bad}/missing.safetensors"]),
    (["--ckpt", "{ckpt}", "--crop-size", "100"], ["--crop-size", "14"]),
    (["--ckpt", "{ckpt}", "--data", "folder", "--data-root", "/nonexistent/root"], ["/nonexistent/root"]),
    (["--ckpt", "{bad}/moved.safetensors"], ["{bad}/gone", "--data-root"]),
    (["--ckpt", "{official}"], ["{official}", "--data"]),
    (["--ckpt", "{backbone}"], ["{backbone}", "not an INP-Former checkpoint"]),  # a plain DINOv2 file
    (["--ckpt", "{ckpt}", "--batch-size", "0"], ["--batch-size", "'0'"]),
    (["--ckpt", "{ckpt}", "--precision", "fp16", "--device", "cpu"], ["fp16", "CUDA"]),
    (["--ckpt", "{ckpt}", "--classes", "nope"], ["nope"]),
    (["--ckpt", "{ckpt}", "--images", "/nonexistent/img.png"], ["/nonexistent/img.png"]),
    (["--ckpt", "{ckpt}", "--no-such-option"], ["--no-such-option"]),
    (["--ckpt", "{ckpt}", "--export", "{bad}/junk.pth"], ["{bad}/junk.pth", "exists"]),  # never replaced
    (["--ckpt", "{ckpt}", "--calibrate", "--zero-shot"], ["--calibrate", "--zero-shot"]),
    (["--ckpt", "{ckpt}", "--export", "{bad}/new.onnx", "--calibrate"], ["--export", "--calibrate"]),
    (["--ckpt", "{ckpt}", "--images", "{bad}", "--heat-range", "0.5", "0.1"], ["--heat-range 0.5 0.1"]),
    (["--ckpt", "{ckpt}", "--calibrate", "--images", "{bad}"], ["--calibrate", "need a test set"]),
    (["--ckpt", "{ckpt}", "--streaming", "--map-dtype", "float16"], ["--map-dtype float16", "--streaming"]),
])
def test_bad_input_fails_with_one_line(argv, words, ckpt, bad_files, tmp_path, capsys):
    names = dict(bad=bad_files, ckpt=ckpt, official=shared(*TINY, "inpformer_official.safetensors"),
                 backbone=shared(*TINY, "backbone_hub.safetensors"))
    argv = [a.format(**names) for a in argv] + ["--workers", "0", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        data.guard(lambda: evaluate.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w.format(**names) in err, err


def test_bad_checkpoint_exit_status_from_the_shell(bad_files):
    r = run_cli("--ckpt", bad_files / "truncated.safetensors")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and str(bad_files / "truncated.safetensors") in r.stderr, r.stderr


def test_bf16_cpu_scoring_agrees_with_fp32():
    """--precision bf16 on the CPU (the whole model cast once, maps and scores in fp32): on the official
    fixture model the maps stay within 1% of their maximum and the scores within 0.5% (measured: 0.18% and
    0.03%)."""
    io = load_file(shared(*TINY, "io.safetensors"))
    fp32 = inpformer.load_model(shared(*TINY, "inpformer_official.safetensors"))
    bf16 = evaluate.prepare(inpformer.load_model(shared(*TINY, "inpformer_official.safetensors")),
                            evaluate.Options(precision="bf16"))
    assert bf16.prototype_token.dtype == torch.bfloat16
    for size in (224, 392):
        (m32, s32), (m16, s16) = evaluate.predict_maps(fp32, io[f"x_{size}"]), evaluate.predict_maps(bf16, io[f"x_{size}"])
        assert m16.dtype == s16.dtype == torch.float32
        assert 0 < (m16 - m32).abs().max() <= 0.01 * m32.abs().max()
        assert (s16 - s32).abs().max() <= 0.005 * s32.abs().max()


def test_a_class_without_ground_truth_gets_image_metrics_only(ckpt, model, demo, tmp_path, capsys):
    shutil.copytree(f"{demo}/tiles", tmp_path / "line" / "tiles", ignore=shutil.ignore_patterns("ground_truth"))
    got = evaluate.evaluate(model, "folder", tmp_path / "line", "all", evaluate.Options(IMAGE, CROP, BATCH),
                            out_dir=tmp_path / "out")
    labels, scores, *_ = reference_maps(model, demo, "tiles")
    m = got["classes"]["tiles"]
    assert m["I-AUROC"] == metrics.auroc(labels, scores) and m["I-F1max"] == metrics.f1_max(labels, scores)
    assert all(m[k] is None for k in ("P-AUROC", "P-AP", "P-F1max", "AUPRO")) and got["mean"]["P-AP"] is None
    assert "no ground_truth/ masks" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["classes"]["tiles"]["AUPRO"] is None
    assert evaluate.markdown_table(got).splitlines()[2].endswith("| — | — | — | — |")
    # a ground_truth/ that exists but lacks a defective image's mask stays an error naming that image
    (tmp_path / "line" / "tiles" / "ground_truth").mkdir()
    with pytest.raises(data.DataError, match="missing/000.png: no mask"):
        data.test_set("folder", tmp_path / "line", "tiles")


def test_export_onnx_round_trip_matches_pytorch(ckpt, model, demo, tmp_path):
    """The whole scoring path of a calibrated checkpoint as ONNX, dynamic batch: onnxruntime's maps, scores and
    normalised scores against PyTorch at batch 1 and 3, the maps within 1e-4 of their maximum."""
    import onnxruntime  # an optional extra for users; CI installs it, so this test never skips there

    images = sorted(Path(demo, "tiles", "test").rglob("*.png"))[:3]
    x = torch.stack([data.load_image(p, IMAGE, CROP) for p in images])
    cal = dict(image_threshold=float(model.predict(x)[1][1]), score_range=[0.0, 1.0], pixel_threshold=0.5,
               heat_range=[0.0, 1.0], classes={})
    notes = []  # an incomplete calibration (hand-edited, say) is ignored with a note, never a traceback
    assert evaluate.read_calibration({"calibration": {"image_threshold": 0.1}}, "x", notes.append) is None
    assert "unreadable calibration metadata" in notes[0]
    path = tmp_path / "model.safetensors"
    shutil.copy(ckpt, path)
    evaluate.write_calibration(path, cal)
    r = run_cli("--ckpt", path, "--export", tmp_path / "model.onnx", "--images", *images[:2])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max |onnx - torch| / max |torch|: anomaly_map" in r.stdout and f"wrote {tmp_path / 'model.onnx'}" in r.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score", "normalised_score"]
    for b in (1, 3):
        want_maps, want_scores = model.predict(x[:b])
        maps, scores, normalised = session.run(None, {"image": x[:b].numpy()})
        assert maps.shape == (b, 256, 256) and scores.shape == (b,)
        assert np.abs(maps - want_maps.numpy()).max() <= 1e-4 * float(want_maps.abs().max())
        assert np.abs(scores - want_scores.numpy()).max() <= 1e-4 * float(want_scores.abs().max())
        assert normalised == pytest.approx([evaluate.decide(float(s), cal)["normalised"] for s in scores], abs=1e-6)
    assert normalised[1] == pytest.approx(0.5, abs=1e-6)  # the threshold


def test_export_without_the_onnx_extras_says_what_to_install(ckpt, tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None; import data, evaluate; "
            f"data.guard(lambda: evaluate.main(['--ckpt', {str(ckpt)!r}, '--export', {str(tmp_path / 'm.onnx')!r}]))")
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
    cal = evaluate.calibration(labels, scores, hist)
    assert cal["rule"] == {"image": "f1-max", "pixel": "f1-max"}
    assert cal["image_threshold"] == metrics.f1_threshold(labels, scores)[1] == 0.28
    assert abs(cal["pixel_threshold"] - metrics.f1_threshold(masks.ravel(), maps.ravel())[1]) <= hist.resolution
    lo, hi = cal["heat_range"]
    assert lo == pytest.approx(np.median(maps[~masks]), abs=hist.resolution)
    assert (lo + hi) / 2 == pytest.approx(cal["pixel_threshold"])
    assert evaluate.decide(0.28, cal)["normalised"] == 0.5 and evaluate.decide(0.27, cal)["decision"] == "normal"

    normal = metrics.PixelHistogram()
    normal.update(masks[:3], maps[:3])
    cal = evaluate.calibration(labels[:3], scores[:3], normal)
    assert cal["rule"] == {"image": "normal mean + 3 std", "pixel": "normal mean + 3 std"}
    assert cal["image_threshold"] == pytest.approx(scores[:3].mean() + 3 * scores[:3].std())
    assert cal["pixel_threshold"] == pytest.approx(maps[:3].mean() + 3 * maps[:3].std(), abs=1e-4)
