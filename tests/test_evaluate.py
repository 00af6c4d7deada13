"""evaluate.py, the benchmark: its metrics against metrics.py on maps computed here independently, the official
fixture's maps through the shared map path, the zero-shot, streaming, float16 and full-resolution protocols,
pictures, checkpoint defaults, the caller's model left as it was, and one-line errors for bad input."""
import csv
import dataclasses
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import data
import evaluate
import inpformer
import line.cpu
import line.pictures
import metrics
from line.adeval import adeval_pixel_metrics
from conftest import BATCH, CROP, DEMO_SIZE, GEOMETRY, IMAGE, ROOT, expect_one_line_error, run_main, shared

TINY = "fixtures", "official_tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


def options(**kw):
    return evaluate.Options(batch_size=BATCH, device="cpu", geometry=GEOMETRY, **kw)


def reference_maps(model, demo, cls, zero_shot=False):
    """Labels, scores, 256x256 masks and maps of one class, written from the official protocol, not from
    evaluate.py: model.predict (or the INP distance of §6.5 by hand), GT nearest to 256 then > 0.5."""
    loader = torch.utils.data.DataLoader(data.test_set("folder", demo, cls, GEOMETRY), batch_size=BATCH)
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
    return run_main(evaluate.main, *argv)


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
        assert (out / "maps" / cls / f"most_01_{line.pictures.file_stem(top)}.png").is_file()
    mean = {k: float(np.mean([results["classes"][c][k] for c in classes])) for k in evaluate.METRICS}
    assert_metrics_equal(results["mean"], mean, tol=1e-12)
    assert "calibration" not in results  # decision rules are predict.py's

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
        references = (("map256", maps, io[f"map256_{size}"][:, 0]), ("score256", scores, io[f"score256_{size}"]))
        for name, got, ref in references:
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
    assert results["protocol"]["geometry"]["crop_size"] == [CROP, CROP]
    out = capsys.readouterr().out
    assert "| tiles |" in out and "was trained at 448 -> 392 px; scoring at 128 -> 112 px as asked" in out


def test_single_class_run_folder_gives_one_table(ckpt, model, demo, tmp_path, capsys):
    run = tmp_path / "single"
    meta = inpformer.read_checkpoint_metadata(ckpt)
    for cls in ("fabric", "tiles"):
        (run / cls).mkdir(parents=True)
        inpformer.save_checkpoint(model, run / cls / "model.safetensors",
                                  dict(data="folder", data_root=demo, classes=[cls], setting="single",
                                       backbone=meta["backbone"]))
    evaluate.main(["--ckpt", str(run), "--workers", "0", "--batch-size", str(BATCH), "--classes", "all"])
    results = json.loads((run / "eval" / "metrics.json").read_text())
    assert list(results["classes"]) == ["fabric", "tiles"]
    assert results["protocol"]["models"] == [str(run / c / "model.safetensors") for c in ("fabric", "tiles")]
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
    got = evaluate.evaluate(model, "folder", demo, ["tiles"], options(zero_shot=True), log=lambda m: None)
    labels, scores, masks, maps, _ = reference_maps(model, demo, "tiles", zero_shot=True)
    assert_metrics_equal(got["classes"]["tiles"], metrics.compute_all(labels, scores, masks, maps), tol=1e-6)
    assert got["protocol"]["maps"] == "inp-distance"


def test_zero_shot_pictures_show_the_inp_distance(model, demo, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "predict", lambda *a, **k: calls.append("reconstruction"))
    evaluate.evaluate(model, "folder", demo, "tiles", options(zero_shot=True, save_maps=1), out_dir=tmp_path)
    assert not calls and len(list((tmp_path / "maps" / "tiles").glob("*.png"))) == 2


def test_streaming_is_within_its_error_bounds_and_float16_is_opt_in(model, demo):
    quiet = dict(log=lambda m: None)
    opts = options()
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
    got = evaluate.evaluate(model, "folder", demo, ["fabric"], options(full_res=True), log=lambda m: None)
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
    inpformer.save_checkpoint(model, moved, dict(data="folder", data_root=str(d / "gone"), classes=["tiles"]))
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
    (["--ckpt", "{ckpt}", "--no-such-option"], ["--no-such-option"]),
    (["--ckpt", "{ckpt}", "--images", "{bad}"], ["--images"]),  # predict.py's, not the benchmark's
    (["--ckpt", "{ckpt}", "--save-maps", "1", "--heat-range", "0.5", "0.1"], ["--heat-range 0.5 0.1"]),
    (["--ckpt", "{ckpt}", "--streaming", "--map-dtype", "float16"], ["--map-dtype float16", "--streaming"]),
    (["--ckpt", "{ckpt}", "--device", "cuda:7"], ["--device cuda:7"]),
])
def test_bad_input_fails_with_one_line(argv, words, ckpt, bad_files, tmp_path, capsys):
    names = dict(bad=bad_files, ckpt=ckpt, official=shared(*TINY, "inpformer_official.safetensors"),
                 backbone=shared(*TINY, "backbone_hub.safetensors"))
    argv = [a.format(**names) for a in argv] + ["--workers", "0", "--out", str(tmp_path / "out")]
    expect_one_line_error(capsys, lambda: evaluate.main(argv), *(w.format(**names) for w in words))


def test_bad_checkpoint_exit_status_from_the_shell(bad_files):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(bad_files / "truncated.safetensors")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and str(bad_files / "truncated.safetensors") in r.stderr, r.stderr


def test_a_class_without_ground_truth_gets_image_metrics_only(ckpt, model, demo, tmp_path, capsys):
    shutil.copytree(f"{demo}/tiles", tmp_path / "line" / "tiles", ignore=shutil.ignore_patterns("ground_truth"))
    got = evaluate.evaluate(model, "folder", tmp_path / "line", "all", options(), out_dir=tmp_path / "out")
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
        data.test_set("folder", tmp_path / "line", "tiles", GEOMETRY)


def test_evaluate_leaves_the_callers_model_as_it_was(model, demo):
    """Asked for bf16, evaluate() scores a cast copy: the caller's model keeps its dtype, device, training mode
    and every parameter; asked for what the model already is, it scores the model itself, also unchanged."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        quiet = dict(log=lambda m: None)
        bf16 = evaluate.evaluate(model, "folder", demo, ["tiles"], options(precision="bf16"), **quiet)
        fp32 = evaluate.evaluate(model, "folder", demo, ["tiles"], options(), **quiet)
        assert model.training and model.encoder.training is False
        after = model.state_dict()
        assert all(after[k].dtype == torch.float32 and after[k].device.type == "cpu" for k in after)
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        model.eval()
    assert bf16["protocol"]["precision"] == "bf16" and fp32["protocol"]["precision"] == "fp32"
    assert abs(bf16["classes"]["tiles"]["I-AUROC"] - fp32["classes"]["tiles"]["I-AUROC"]) <= 0.1


def test_adeval_metrics_are_the_official_codes(ckpt, model, demo, tmp_path, capsys):
    """--metrics adeval: P-AUROC, P-AP and AUPRO from ADEval's 200 bins per class (line.adeval
    on the protocol's maps), the other four exact; recorded in metrics.json, written apart from the exact run."""
    evaluate.main(["--ckpt", str(ckpt), "--metrics", "adeval", "--workers", "0", "--batch-size", str(BATCH)])
    results = json.loads((ckpt.parent / "eval-adeval" / "metrics.json").read_text())
    assert results["protocol"]["metrics"].startswith("adeval 1.1.0")
    for cls in ("fabric", "tiles"):
        labels, scores, masks, maps, _ = reference_maps(model, demo, cls)
        exact = metrics.compute_all(labels, scores, masks, maps)
        binned = adeval_pixel_metrics(masks, maps)
        want = {k: binned.get(k, exact[k]) for k in evaluate.METRICS}
        assert_metrics_equal(results["classes"][cls], want)
        assert results["classes"][cls]["P-AP"] != exact["P-AP"]  # the trapezoid on 200 bins is not the exact AP
    expect_one_line_error(capsys, lambda: evaluate.main(["--ckpt", str(ckpt), "--metrics", "adeval", "--streaming"]),
                          "--metrics adeval", "--streaming")


def test_held_out_images_of_the_checkpoints_classes_are_its_own_data(demo, tmp_path):
    """--data folder over a folder of the checkpoint's own classes is its data (no zero-shot note, all classes
    there); over other classes, another data set."""
    shutil.copytree(f"{demo}/tiles", tmp_path / "held" / "tiles")
    shutil.copytree(f"{demo}/tiles", tmp_path / "other" / "bricks")
    meta = dict(data="mvtec", data_root="/data/mvtec", classes=["tiles", "fabric"])
    [held] = evaluate.plan_data_sets(meta, "ckpt", "folder", str(tmp_path / "held"))
    [other] = evaluate.plan_data_sets(meta, "ckpt", "folder", str(tmp_path / "other"))
    assert (held.own, held.classes) == (True, "all") and other.own is False