"""Every pixel of a real frame (issue 24): rectangular whole frames, tiles, defects in the band the paper's crop
removes, frames of mixed sizes, 16-bit and other pixel formats, and the MVTec AD 2 layout."""
import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import inpformer
import line.frames
import predict
import train
from conftest import GEOMETRY, expect_one_line_error, run_main, shared
from line.geometry import Geometry

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPTS = {"train.py": train.main, "evaluate.py": evaluate.main, "predict.py": predict.main}
TINY_WEIGHTS = shared("fixtures", "official_tiny", "backbone_hub.safetensors")


def write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


# -----------------------------------------------------------------------------------------------------
# Geometry, tiles and stitching


def test_geometry_sizes_and_tile_positions():
    g = Geometry((350, 140), None)
    assert g.crop_size is None and g.input_size() == (350, 140)
    assert g.frame_size(77, 999) == (350, 140) and g.crop_box(350, 140) == (0, 0, 350, 140)
    assert Geometry(448, 392) == Geometry((448, 448), (392, 392))
    assert data.geometry_of(Geometry(448, 392).to_dict()) == data.ResizeCrop()  # the paper's, read by the core
    assert data.geometry_of(g.to_dict()) == g
    tiled = Geometry((126, 300), None, tile=112, tile_overlap=0.25)
    positions = tiled.tile_positions(126, 300)
    assert positions == [(t, l) for t in (0, 14) for l in (0, 84, 168, 188)]  # 84 apart, the last flush
    covered = np.zeros((126, 300), bool)
    for top, left in positions:
        covered[top:top + 112, left:left + 112] = True
    assert covered.all()
    native = Geometry(None, None, tile=112)
    assert native.frame_size(100, 300) == (112, 336)  # too short for a tile: enlarged, aspect kept
    for bad, words in [(Geometry((350, 141), None), "--image-size 350x141"), (Geometry(None, None), "--tile"),
                       (Geometry(448, None, tile=100), "--tile 100"), (Geometry(448, 392, tile=112), "none"),
                       (Geometry(112, None, tile=112, tile_overlap=1.0), "--tile-overlap")]:
        with pytest.raises(ValueError, match=words):
            bad.check(14)


def test_a_single_tile_covering_the_frame_is_the_whole_frame_pass(model):
    """One tile covering the frame: the whole-frame pass's map, and its score under the stitched rule; under the
    tiles rule, the tile's score as the paper scores an image."""
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    whole = line.frames.predict_frames(model, x, Geometry(112, None))
    stitched = line.frames.predict_frames(model, list(x), Geometry(112, None, tile=112, image_score="stitched"))
    tiles = line.frames.predict_frames(model, list(x), Geometry(112, None, tile=112, image_score="tiles"))
    assert torch.equal(whole[0], stitched[0]) and torch.equal(whole[1], stitched[1])
    assert torch.equal(whole[0], tiles[0])
    assert torch.allclose(tiles[1], inpformer.score_maps(model.raw_maps(x))[1], rtol=1e-6)


def test_overlapping_tiles_stitch_without_seams_and_borders_keep_their_level(model, monkeypatch):
    """A constant raw map stays constant through overlapping tiles, the resample and the reflect-padded Gaussian;
    the paper's zero padding (its crop) darkens the border."""
    monkeypatch.setattr(model, "raw_maps", lambda x, zero_shot=False: torch.full((len(x), 1, *x.shape[-2:]), 0.3))
    frame = torch.zeros(3, 154, 266)
    maps, scores = line.frames.predict_tiled(model, frame, tile=56, overlap=0.4, image_score="tiles")
    assert torch.allclose(maps, torch.full_like(maps, 0.3), atol=1e-6) and abs(float(scores[0]) - 0.3) < 1e-6
    paper, _ = model.predict(torch.zeros(1, 3, 112, 112))
    assert float(paper[0, 0, 0]) < 0.3 * 0.6 and abs(float(paper[0, 128, 128]) - 0.3) < 1e-6


def test_a_defect_in_one_tile_scores_that_tiles_score_not_the_frames_diluted_one(model, monkeypatch):
    """Each tile's raw map is its own first channel: a 6 x 6 spot in one of nine 56 px tiles. Scored tile by tile,
    the frame's image score is exactly that tile's own score (its map scored as the paper scores an image); the
    stitched rule averages the spot into the whole frame's 256 x 256 and scores a fraction of it. The maps are
    the stitched map's under both rules."""
    monkeypatch.setattr(model, "raw_maps", lambda x, zero_shot=False: x[:, :1].float())
    frame = torch.zeros(3, 168, 168)
    frame[0, 70:76, 120:126] = 1.0  # inside the tile at (56, 112) alone
    tiles, by_tiles = line.frames.predict_tiled(model, frame, tile=56, batch_size=4, image_score="tiles")
    stitched, by_frame = line.frames.predict_tiled(model, frame, tile=56, batch_size=4, image_score="stitched")
    own = inpformer.score_maps(frame[None, :1, 56:112, 112:168])[1]
    assert torch.equal(by_tiles, own) and torch.equal(tiles, stitched)
    assert torch.equal(by_frame, line.frames.score_frame_maps(frame[None, :1])[1])
    assert float(by_tiles[0]) > 5 * float(by_frame[0]) > 0
    geometry = Geometry(168, None, tile=56, image_score="tiles")  # the same through the geometry's rule
    assert torch.equal(line.frames.predict_frames(model, [frame], geometry)[1], own)


def test_the_image_score_rule_is_recorded_and_a_model_recorded_before_it_keeps_stitched():
    """A model trained on tiles records the tile-by-tile score; scoring follows the record, and a geometry recorded
    without the rule (every model trained before it) reads as stitched and keeps it unless --image-score asks; the
    rule is refused without tiles, and does not take part in a resumed run's identity (scoring, not training)."""
    tiled = train.parse_args(["--data", "demo", "--tile", "56"]).geometry
    assert tiled.image_score == "tiles" and data.geometry_of(tiled.to_dict()) == tiled
    assert train.parse_args(["--data", "demo", "--tile", "56", "--image-score", "stitched"]).geometry.image_score \
        == "stitched"
    flags = dict(image_size=None, crop_size=None, tile=None, tile_overlap=None, bit_depth=None, image_score=None)
    assert train.geometry(argparse.Namespace(**dict(flags, tile=56)), data.ResizeCrop()).image_score == "stitched"
    before = {k: v for k, v in tiled.to_dict().items() if k != "image_score"}  # as checkpoints recorded it
    old = data.geometry_of(before)
    assert old.image_score == "stitched" and "stitched frame" in old.describe()
    assert train.geometry(argparse.Namespace(**flags), old).image_score == "stitched"
    assert train.geometry(argparse.Namespace(**dict(flags, tile=112)), old).image_score == "stitched"
    assert train.geometry(argparse.Namespace(**dict(flags, image_score="tiles")), old).image_score == "tiles"
    assert train.geometry(argparse.Namespace(**dict(flags, tile="none")), old).image_score == "stitched"
    with pytest.raises(ValueError, match="--image-score tiles: how a tiled frame is scored, with --tile N"):
        train.geometry(argparse.Namespace(**dict(flags, image_score="tiles")), data.ResizeCrop())
    with pytest.raises(ValueError, match="--image-score mean"):
        Geometry(168, None, tile=56, image_score="mean").check()
    args = argparse.Namespace(geometry=tiled, inp_num=6, setting="multi", shots=None, batch_size=8, seed=1)
    identity = train.run_identity(args, [("folder", "root", ["a"])])
    train.check_identity("state", dict(identity=dict(identity, geometry=before)), identity)


def test_a_checkpoint_recorded_before_the_rule_scores_as_before(ckpt, demo, tmp_path):
    """predict.py --images on a tiled model whose geometry has no rule recorded: the stitched map's score, as
    before; --image-score tiles asks for its best tile's."""
    model = inpformer.load_model(ckpt)
    recorded = {k: v for k, v in Geometry(112, None, tile=56).to_dict().items() if k != "image_score"}
    model.config.geometry = recorded
    path = tmp_path / "old.safetensors"
    inpformer.save_checkpoint(model, path)
    image = Path(demo, "tiles", "test", "spot", "000.png")
    x = data.load_image(image, data.geometry_of(recorded))
    scores = {}
    for rule in ("stitched", "tiles"):
        stitched = line.frames.stitch_tiles(x[None], 56, 0.0, model.raw_maps)
        scores[rule] = float(line.frames.score_tiled(*stitched, rule)[1][0])
    for flags, rule in (([], "stitched"), (["--image-score", "tiles"], "tiles")):
        out = tmp_path / rule
        run("predict.py", "--ckpt", path, "--images", image, "--out", out, "--workers", 0, *flags)
        with open(out / "predictions.csv") as f:
            [row] = list(csv.DictReader(f))
        assert float(row["score"]) == pytest.approx(scores[rule], rel=1e-6), rule
    assert scores["tiles"] != scores["stitched"]


def test_where_tiles_overlap_their_maps_are_averaged():
    """Each tile's map is the constant k (its position's index): a pixel covered by several tiles gets the mean of
    their constants, not the maximum nor the last tile's."""
    frame = torch.zeros(1, 3, 56, 98)  # tiles of 56 overlapping 0.5: columns 0-55, 28-83 and 42-97 (flush)
    calls = []

    def tile_maps(tiles):
        calls.append(len(tiles))
        first = sum(calls[:-1])
        return torch.arange(first, first + len(tiles), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 56, 56)

    stitched, best_tile = line.frames.stitch_tiles(frame, 56, 0.5, tile_maps, batch_size=1)
    stitched = stitched[0, 0]
    assert calls == [1, 1, 1] and float(best_tile[0]) == pytest.approx(2.0)  # the highest tile's own score
    covered_by = {0: (0,), 30: (0, 1), 50: (0, 1, 2), 70: (1, 2), 90: (2,)}
    for column, tiles in covered_by.items():
        assert stitched[:, column].eq(sum(tiles) / len(tiles)).all(), column


def test_whole_frames_resample_antialiased_so_a_thin_defect_scores_wherever_it_falls():
    """A one-pixel line in a 1024 x 1024 frame map, moved a column at a time: the whole frame's scoring (reflect
    padding, antialiased resample to 256) scores it alike at every place; the paper's plain bilinear resample of its
    crop keeps it or drops it whole, by where it falls."""
    scores = {"reflect": [], "zeros": []}
    for column in range(500, 508):
        frame_map = torch.zeros(1, 1, 1024, 1024)
        frame_map[..., column] = 1.0
        scores["reflect"].append(float(line.frames.score_frame_maps(frame_map)[1]))
        scores["zeros"].append(float(inpformer.score_maps(frame_map)[1]))
    assert min(scores["reflect"]) > 0.98 * max(scores["reflect"]) > 0
    assert min(scores["zeros"]) == 0 < max(scores["zeros"])


def band_defects(demo):
    """Good demo test images, each with a copy whose defect lies wholly in the band the centre crop removes."""
    pairs = []
    for cls in ("tiles", "fabric"):
        for i in range(3):
            clean = np.asarray(Image.open(f"{demo}/{cls}/test/good/{i:03d}.png").convert("RGB")).copy()
            bad = clean.copy()
            bad[1:8, 40:120] = 255 - bad[1:8, 40:120]  # a scratch along the top edge, inside the outer 10 px
            pairs.append((Image.fromarray(clean), Image.fromarray(bad)))
    return pairs


def test_a_defect_in_the_outer_band_is_found_whole_frame_and_missed_by_the_crop(model, demo):
    whole = Geometry(154, None)
    for clean, bad in band_defects(demo):
        # the paper's crop: the model's input is the same pixels with or without the defect; no model can see it
        assert torch.equal(data.load_image(clean, GEOMETRY), data.load_image(bad, GEOMETRY))
        (m_clean, s_clean), (m_bad, s_bad) = (line.frames.predict_frames(model, data.load_image(im, whole)[None], whole)
                                              for im in (clean, bad))
        rise = (m_bad - m_clean)[0]
        assert s_bad > s_clean
        assert rise[:16, 64:192].mean() > 3 * rise[40:].abs().mean()  # where the scratch is, not elsewhere


# -----------------------------------------------------------------------------------------------------
# Whole frames and tiles through train.py, evaluate.py and predict.py


def run(script, *argv):
    r = run_main(SCRIPTS[script], *argv)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_a_rectangular_whole_frame_run_trains_evaluates_and_predicts(demo, tmp_path):
    out = tmp_path / "run"
    r = run("train.py", "--data", "folder", "--data-root", demo, "--weights", TINY_WEIGHTS, "--image-size", "112x168",
            "--crop-size", "none", "--batch-size", 4, "--iters", 3, "--workers", 0, "--out", out)
    assert "images: 112x168 px, the whole frame" in r.stdout  # the size it parsed: 112 rows high, 168 wide
    model = inpformer.load_model(out / "model.safetensors")
    assert data.geometry_of(model.config.geometry) == Geometry((112, 168), None)
    results = json.loads((out / "eval" / "metrics.json").read_text())
    assert results["protocol"]["gaussian_padding"] == "reflect" and set(results["classes"]) == {"fabric", "tiles"}
    image = Path(demo, "tiles", "test", "spot", "000.png")
    run("predict.py", "--ckpt", out / "model.safetensors", "--images", image, "--out", tmp_path / "pred",
        "--workers", 0)
    with open(tmp_path / "pred" / "predictions.csv") as f:
        [row] = list(csv.DictReader(f))
    x = data.load_image(image, data.geometry_of(model.config.geometry))
    assert x.shape == (3, 112, 168)
    assert abs(float(row["score"]) - float(line.frames.predict_frames(model, x[None])[1][0])) < 1e-5
    # its picture keeps the frame's shape (2 : 3), not the map's square: image and overlay, 256 x 384 each
    [heatmap] = (tmp_path / "pred" / "heatmaps").glob("*.png")
    assert Image.open(heatmap).size == (2 * 384 + 84, 256 + 14)


def mixed_sizes(root, demo):
    """The demo's tiles class with every image cut to its own size (wider, taller, smaller than a tile)."""
    sizes = [(160, 160), (100, 150), (160, 90), (130, 120), (70, 160), (150, 100)]
    for split in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        for k, p in enumerate(sorted(Path(demo, "tiles", split).glob("*.png"))):
            h, w = sizes[k % len(sizes)]
            target = root / "tiles" / split / p.name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(p).crop((0, 0, w, h)).save(target)
    return root


def test_a_class_of_mixed_sizes_trains_tiled_at_each_frames_own_scale(demo, tmp_path):
    root = mixed_sizes(tmp_path / "mixed", demo)
    out = tmp_path / "run"
    r = run("train.py", "--data", "folder", "--data-root", root, "--weights", TINY_WEIGHTS, "--image-size", "native",
            "--tile", 56, "--tile-overlap", 0.5, "--batch-size", 4, "--iters", 3, "--workers", 0, "--out", out,
            "--cache-features")
    assert "each frame's own size, tiles of 56 px overlapping 0.5" in r.stdout
    results = json.loads((out / "eval" / "metrics.json").read_text())
    assert results["counts"]["tiles"] == {"normal": 4, "anomalous": 2}
    assert all(0 <= results["classes"]["tiles"][k] <= 1 for k in ("I-AUROC", "P-AUROC"))
    # each tile of each training frame is a training sample
    g = data.geometry_of(inpformer.load_model(out / "model.safetensors").config.geometry)
    frames = [g.frame_size(*reversed(data.image_size(s.image)))
              for s in data.list_samples("folder", root, "tiles", "train")]
    assert len(data.train_set("folder", root, "all", g)) == sum(len(g.tile_positions(*f)) for f in frames)
    # --full-res scores each frame's own pixels, the whole frame
    r = run("evaluate.py", "--ckpt", out / "model.safetensors", "--full-res", "--streaming", "--workers", 0)
    assert "pixels at original resolution" in r.stdout


def test_a_tiled_training_frame_is_decoded_once_into_the_store(demo, tmp_path, monkeypatch):
    root = mixed_sizes(tmp_path / "mixed", demo)
    g = Geometry(image_size=None, crop_size=None, tile=56, tile_overlap=0.5)
    tiles = data.train_set("folder", root, "all", g)
    opened = []
    read = data._open
    monkeypatch.setattr(data, "_open", lambda path, *a: opened.append(path) or read(path, *a))
    store = data.image_store(tiles, tmp_path / "image_cache", log=lambda m: None)
    assert sorted(opened) == sorted(s.image for s in tiles.samples)  # each frame once, not once per tile
    opened.clear()
    assert len(store) == len(tiles) > len(tiles.samples)
    for k in range(len(tiles)):
        assert torch.equal(data.normalise(store.__getitems__([k]))[0], tiles[k]["image"]), k


def test_full_res_whole_frame_masks_cover_every_pixel(demo):
    ds = data.test_set("folder", demo, "tiles", Geometry(126, None), native=True)
    item = next(ds[i] for i in range(len(ds)) if ds.samples[i].mask)
    with Image.open(ds.samples[[s.image for s in ds.samples].index(item["path"])].mask) as m:
        assert item["native_mask"].shape == (m.height, m.width)
        assert torch.equal(item["native_mask"], torch.from_numpy(np.asarray(m) > 127))


# -----------------------------------------------------------------------------------------------------
# Pixel formats


def test_a_16_bit_png_keeps_its_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = write(tmp_path / "frame16.png", ramp)
    assert Image.open(path).mode.startswith("I;16")
    g = Geometry(56, None)
    x = data.load_image(path, g)
    grey = x[0] * data.IMAGENET_STD[0] + data.IMAGENET_MEAN[0]
    assert float(grey.min()) < 0.05 and float(grey.max()) > 0.95  # the whole range, not near-white
    level = 3 / 255 / min(data.IMAGENET_STD)  # three 8-bit grey levels, ImageNet-normalised
    eight = write(tmp_path / "frame8.png", (ramp // 257).astype(np.uint8))
    assert torch.allclose(x, data.load_image(eight, g), atol=level)  # the same picture as in 8 bits
    # 12-bit data in 16-bit files: --bit-depth 12 stretches it to the range; values above 4095 are refused
    twelve = write(tmp_path / "frame12.png", (ramp // 16).astype(np.uint16))
    assert torch.allclose(data.load_image(twelve, Geometry(56, None, bit_depth=12)), x, atol=level)
    with pytest.raises(data.DataError, match=r"frame16.png: I;16.* 12-bit data lies in \[0, 4095\]"):
        data.load_image(path, Geometry(56, None, bit_depth=12))


def test_float_palette_alpha_and_unsupported_formats(tmp_path):
    g = Geometry(28, None)
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = tmp_path / "f.tif"
    Image.fromarray(ramp, "F").save(path)
    assert float(data.load_image(path, g)[0].max()) > 2.0  # 1.0, ImageNet-normalised
    Image.fromarray(ramp * 4, "F").save(tmp_path / "loud.tif")
    with pytest.raises(data.DataError, match="loud.tif: F values from 0 to 4.*float images must hold values in"):
        data.load_image(tmp_path / "loud.tif", g)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    assert data.load_image(tmp_path / "p.png", g).shape == data.load_image(tmp_path / "a.png", g).shape == (3, 28, 28)
    Image.fromarray(rgb, "RGB").convert("LAB").save(tmp_path / "lab.tif")
    with pytest.raises(data.DataError, match="lab.tif: pixel format 'LAB' is not supported"):
        data.load_image(tmp_path / "lab.tif", g)


# -----------------------------------------------------------------------------------------------------
# MVTec AD 2


def mvtec2_tree(root, demo):
    """Two objects in MVTec AD 2's layout, from demo images."""
    for obj, cls in (("can", "tiles"), ("vial", "fabric")):
        src = Path(demo, cls)
        for i, p in enumerate(sorted((src / "train" / "good").glob("*.png"))):
            target = root / obj / ("train" if i < 6 else "validation") / "good" / p.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
        for p in sorted((src / "test" / "good").glob("*.png")):
            (root / obj / "test_public" / "good").mkdir(parents=True, exist_ok=True)
            (root / obj / "test_public" / "good" / p.name).write_bytes(p.read_bytes())
        for k, p in enumerate(sorted((src / "test").glob("*/*.png"))):
            if p.parent.name == "good":
                continue
            mask = src / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
            for folder, file, name in (("test_public/bad", p, f"{k:03d}.png"),
                                       ("test_public/ground_truth/bad", mask, f"{k:03d}_mask.png")):
                (root / obj / folder).mkdir(parents=True, exist_ok=True)
                (root / obj / folder / name).write_bytes(file.read_bytes())
        (root / obj / "test_private").mkdir()
        (root / obj / "test_private" / "000.png").write_bytes(p.read_bytes())
    return root


def test_the_mvtec_ad_2_layout(demo, tmp_path, capsys):
    root = mvtec2_tree(tmp_path / "mvtec_ad_2", demo)
    assert data.list_classes("mvtec2", root) == ["can", "vial"]  # the official order
    assert len(data.list_samples("mvtec2", root, "can", "train")) == 6
    validation = data.list_samples("mvtec2", root, "can", "validation")
    assert len(validation) == 2 and all(s.label == 0 for s in validation)
    test = data.list_samples("mvtec2", root, "can", "test")
    bad = [s for s in test if s.label]
    assert len(test) == 10 and len(bad) == 6 and all(s.mask.endswith("_mask.png") for s in bad)
    assert all("/test_public/" in s.image for s in test)
    with pytest.raises(data.DataError, match="has no validation split"):
        data.list_samples("mvtec", root, "can", "validation")
    # --calibrate on MVTec AD 2 learns from the validation images (good only: the normal-score rule)
    path = tmp_path / "model.safetensors"
    path.write_bytes(Path(shared("fixtures", "official_tiny", "inpformer_official.safetensors")).read_bytes())
    predict.main(["--ckpt", str(path), "--calibrate", "--data", "mvtec2", "--data-root", str(root), "--image-size",
                  "126", "--crop-size", "none", "--workers", "0"])
    cal = inpformer.read_checkpoint_metadata(path)["calibration"]
    assert cal["rule"]["image"] == "normal mean + 3 std" and cal["normal"]["images"] == 4
    assert cal["class_names"] == ["can", "vial"]
    expect_one_line_error(capsys, lambda: data.main(["--check", "mvtec2", str(tmp_path / "nowhere")]), "nowhere")
