"""data.py: layouts, pairing, the official preprocessing, few-shot expansion, the demo set and bad input."""
import csv
import json
import math
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import train
from conftest import ROOT, shared
from data import ResizeCrop as Geometry

SMALL = dict(geometry=Geometry(64, 56))   # enough pixels to test geometry, fast enough for many images


def write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, fmt)
    return path


def texture(seed, h=48, w=40):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3))


def square_mask(h=48, w=40, value=255):
    m = np.zeros((h, w), np.uint8)
    m[10:30, 8:24] = value
    return m


def mvtec_tree(root, classes=("bottle", "carpet")):
    """Two normal train images, one good and two defect test images (one per defect type) per class."""
    for c in classes:
        for i in range(2):
            write(root / c / "train" / "good" / f"{i:03d}.png", texture(i))
        write(root / c / "test" / "good" / "000.png", texture(10))
        for d in ("crack", "hole"):
            write(root / c / "test" / d / "000.png", texture(20))
            write(root / c / "ground_truth" / d / "000_mask.png", square_mask())
    return root


# ----------------------------------------------------------------------------------------------------------
# Layouts

def test_the_normalisation_is_imagenets(tmp_path):
    """The official transform's constants, written out: an image of one colour normalises to (v / 255 - mean) / std
    per channel, in float32."""
    assert data.IMAGENET_MEAN == (0.485, 0.456, 0.406) and data.IMAGENET_STD == (0.229, 0.224, 0.225)
    Image.new("RGB", (20, 20), (255, 128, 0)).save(tmp_path / "one.png")
    x = data.load_image(tmp_path / "one.png", Geometry(16, 14))
    want = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    assert x.dtype == torch.float32 and x.shape == (3, 14, 14)
    assert torch.allclose(x, torch.tensor(want).view(3, 1, 1).expand(3, 14, 14), atol=1e-6)


def test_mvtec_layout_classes_counts_labels_and_mask_pairing(tmp_path):
    root = mvtec_tree(tmp_path, ("bottle", "carpet", "zz_custom"))
    (tmp_path / "notes").mkdir()                                      # not a class: no train/good or test
    (tmp_path / "bottle" / "train" / "good" / "readme.txt").write_text("not an image")
    write(tmp_path / "bottle" / "train" / "good" / "._000.png", texture(0))   # macOS resource fork
    # Official order first (textures before objects), then the rest sorted; "folder" is simply sorted.
    assert data.list_classes("mvtec", root) == ["carpet", "bottle", "zz_custom"]
    assert data.list_classes("folder", root) == ["bottle", "carpet", "zz_custom"]
    assert data.resolve_classes("mvtec", root, "all") == ["carpet", "bottle", "zz_custom"]
    assert data.resolve_classes("mvtec", root, "bottle, zz_custom") == ["bottle", "zz_custom"]

    train = data.list_samples("mvtec", root, "bottle", "train")
    assert [s.label for s in train] == [0, 0] and all(s.mask is None for s in train)
    test = data.list_samples("mvtec", root, "bottle", "test")
    assert [(s.defect, s.label) for s in test] == [("crack", 1), ("good", 0), ("hole", 1)]
    for s in test:
        if s.label:
            assert s.mask == str(root / "bottle" / "ground_truth" / s.defect / "000_mask.png")
        else:
            assert s.mask is None


def test_mask_pairing_is_by_stem_not_by_sorted_order(tmp_path):
    root = mvtec_tree(tmp_path, ("bottle",))
    write(root / "bottle" / "test" / "crack" / "007.png", texture(1))
    write(root / "bottle" / "ground_truth" / "crack" / "007_mask.png", square_mask())
    write(root / "bottle" / "ground_truth" / "crack" / "003_mask.png", square_mask())   # an orphan mask
    pairs = {s.image.split("/")[-1]: s.mask.split("/")[-1]
             for s in data.list_samples("mvtec", root, "bottle", "test") if s.defect == "crack"}
    assert pairs == {"000.png": "000_mask.png", "007.png": "007_mask.png"}


def visa_prepared_tree(root):
    for c in ("pcb1", "candle"):
        d = root / "1cls" / c
        for i in range(3):
            write(d / "train" / "good" / f"{i:03d}.JPG", texture(i), "JPEG")
        write(d / "test" / "good" / "000.JPG", texture(5), "JPEG")
        for i in range(2):
            write(d / "test" / "bad" / f"{i:03d}.JPG", texture(6 + i), "JPEG")
            write(d / "ground_truth" / "bad" / f"{i:03d}.png", square_mask())     # no _mask suffix
    return root


def test_visa_prepared_layout(tmp_path):
    visa_prepared_tree(tmp_path)
    for root in (tmp_path, tmp_path / "1cls"):        # VisA_pytorch/ or VisA_pytorch/1cls/
        assert data.list_classes("visa", root) == ["candle", "pcb1"]
        assert len(data.list_samples("visa", root, "pcb1", "train")) == 3
        test = data.list_samples("visa", root, "pcb1", "test")
        assert [(s.defect, s.label) for s in test] == [("bad", 1), ("bad", 1), ("good", 0)]
        assert [s.mask.split("/")[-1] for s in test[:2]] == ["000.png", "001.png"]
        assert all(s.mask_threshold is None for s in test)


def visa_raw_tree(root):
    rows = [("object", "split", "label", "image", "mask")]
    for c in ("pcb1", "capsules"):
        for i in range(3):
            rows.append((c, "train", "normal", f"{c}/Data/Images/Normal/{i:04d}.JPG", ""))
            write(root / c / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", texture(i), "JPEG")
        rows.append((c, "test", "normal", f"{c}/Data/Images/Normal/0100.JPG", ""))
        write(root / c / "Data" / "Images" / "Normal" / "0100.JPG", texture(9), "JPEG")
        for i, cls_id in enumerate((1, 3)):
            rows.append((c, "test", "anomaly", f"{c}/Data/Images/Anomaly/{i:03d}.JPG",
                         f"{c}/Data/Masks/Anomaly/{i:03d}.png"))
            write(root / c / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG", texture(20 + i), "JPEG")
            write(root / c / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", square_mask(value=cls_id))
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def test_visa_raw_download_with_split_csv(tmp_path):
    root = visa_raw_tree(tmp_path)
    assert data.list_classes("visa", root) == ["capsules", "pcb1"]
    train = data.list_samples("visa", root, "pcb1", "train")
    assert len(train) == 3 and {s.label for s in train} == {0}
    test = data.list_samples("visa", root, "pcb1", "test")
    assert [(s.label, s.defect) for s in test] == [(0, "good"), (1, "bad"), (1, "bad")]
    assert test[1].mask.endswith("pcb1/Data/Masks/Anomaly/000.png") and test[1].mask_threshold == 0
    # Class-index values 1 and 3 are anomalous; read as 0/255 grey they would vanish under the 0.5 threshold.
    ds = data.ImageDataset(test, **SMALL)
    assert ds[0]["mask"].sum() == 0
    assert ds[1]["mask"].sum() > 0 and torch.equal(ds[1]["mask"], ds[2]["mask"])


def realiad_tree(root, doubled=True):
    jsons = root / "realiad_jsons" / ("realiad_jsons" if doubled else "")
    for c in ("audiojack", "pcb"):
        cdir = root / "realiad_1024" / c
        rec = {"train": [], "test": []}
        for v in range(1, 6):                     # one physical sample, five camera views
            p = f"OK/S0001/{c}_0001_OK_C{v}_2023.jpg"
            write(cdir / p, texture(v), "JPEG")
            rec["train"].append({"image_path": p, "mask_path": None, "anomaly_class": "OK"})
        p = f"OK/S0002/{c}_0002_OK_C1_2023.jpg"
        write(cdir / p, texture(9), "JPEG")
        rec["test"].append({"image_path": p, "mask_path": "", "anomaly_class": "OK"})
        for v in range(1, 6):
            p = f"NG/AK/S0003/{c}_0003_NG_C{v}_2023"
            write(cdir / (p + ".jpg"), texture(30 + v), "JPEG")
            m = square_mask(value=200)
            m[0:5] = 100                              # soft downsampled edge: below 127 is normal
            write(cdir / (p + ".png"), m)
            rec["test"].append({"image_path": p + ".jpg", "mask_path": p + ".png", "anomaly_class": "AK"})
        jsons.mkdir(parents=True, exist_ok=True)
        (jsons / f"{c}.json").write_text(json.dumps(rec))
    (root / "realiad_jsons" / "realiad_jsons_sv").mkdir(exist_ok=True)        # a variant the loader ignores
    return root


@pytest.mark.parametrize("doubled", [True, False])
def test_realiad_json_layout(tmp_path, doubled):
    root = realiad_tree(tmp_path, doubled)
    assert data.list_classes("realiad", root) == ["audiojack", "pcb"]
    assert len(data.list_samples("realiad", root, "pcb", "train")) == 5
    test = data.list_samples("realiad", root, "pcb", "test")
    assert [(s.label, s.defect) for s in test] == [(0, "good")] + [(1, "AK")] * 5     # every view its own image
    assert all(s.mask_threshold is None for s in test[1:])
    # Soft edges are binarised once, after the resize (official: Resize, ToTensor, > 0.5), not before it too.
    with Image.open(test[1].mask) as raw:
        official = np.asarray(raw.convert("L").resize((64, 64), Image.BILINEAR).crop((4, 4, 60, 60))) / 255 > 0.5
        binarised = raw.point(lambda v: 255 * (v > 127))
        twice = np.asarray(binarised.resize((64, 64), Image.BILINEAR).crop((4, 4, 60, 60))) > 127
    got = data.ImageDataset(test, **SMALL)[1]["mask"][0].numpy() > 0.5
    assert np.array_equal(got, official) and not np.array_equal(got, twice)
    shutil.rmtree(tmp_path / "realiad_1024" / "pcb")            # json present, class zip not unpacked
    assert data.list_classes("realiad", root) == ["audiojack"]


# ----------------------------------------------------------------------------------------------------------
# The official preprocessing

def reference_pipeline(path, image_size, crop_size):
    """torchvision's Resize -> ToTensor -> CenterCrop -> Normalize, with the torch ops those transforms run."""
    im = Image.open(path).convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    top = int(round((image_size - crop_size) / 2.0))
    x = x[:, top:top + crop_size, top:top + crop_size]
    return x.sub_(torch.tensor(data.IMAGENET_MEAN)[:, None, None]).div_(torch.tensor(data.IMAGENET_STD)[:, None, None])


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_pipeline_shapes_ranges_and_reference_values(tmp_path, mode):
    path = tmp_path / "x.png"
    Image.fromarray(texture(3, 61, 83).astype(np.uint8)).convert(mode).save(path)
    x = data.load_image(path, Geometry(72, 63))
    assert x.shape == (3, 63, 63) and x.dtype == torch.float32
    assert torch.equal(x, reference_pipeline(path, 72, 63))                 # bit for bit
    lo = (0 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    hi = (1 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    assert (x.amin((1, 2)).numpy() >= lo - 1e-6).all() and (x.amax((1, 2)).numpy() <= hi + 1e-6).all()
    if mode == "L":
        denorm = x * torch.tensor(data.IMAGENET_STD)[:, None, None] + torch.tensor(data.IMAGENET_MEAN)[:, None, None]
        assert torch.allclose(denorm[0], denorm[1], atol=1e-6) and torch.allclose(denorm[1], denorm[2], atol=1e-6)


def test_default_sizes_and_centre_crop_rounding(tmp_path):
    root = mvtec_tree(tmp_path, ("bottle",))
    item = data.test_set("mvtec", root, "bottle", Geometry())[0]  # the paper's 448 -> 392
    assert item["image"].shape == (3, 392, 392) and item["mask"].shape == (1, 392, 392)
    # torchvision CenterCrop: top = int(round((10 - 7) / 2)) = 2 (round half to even).
    columns = np.tile(np.arange(10, dtype=np.uint8) * 20, (10, 1))
    x = data.load_image(write(tmp_path / "cols.png", columns), Geometry(10, 7))
    first = x[0, 0, 0] * data.IMAGENET_STD[0] + data.IMAGENET_MEAN[0]
    assert abs(first.item() - 40 / 255) < 1e-6


def test_mask_follows_the_image_defect_through_resize_and_crop(tmp_path):
    h, w = 240, 320                                   # not square: the resize changes the aspect ratio
    image = np.full((h, w, 3), 60, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    image[50:130, 190:250] = 220
    mask[50:130, 190:250] = 255
    s = data.Sample(str(write(tmp_path / "test" / "a.png", image)), str(write(tmp_path / "gt" / "a.png", mask)),
                    1, "c", "square")
    item = data.ImageDataset([s], Geometry())[0]
    m = item["mask"][0].bool()
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    # Pixels the defect changed (more than half way to its brightness) are exactly the mask's foreground.
    grey = item["image"][0] * data.IMAGENET_STD[0] + data.IMAGENET_MEAN[0]
    changed = grey > (60 + 220) / 2 / 255
    assert (changed != m).sum() <= 4
    # And both sit where the geometry puts the square: x' = x * 448/320 - 28, y' = y * 448/240 - 28.
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert abs(ys.min().item() - (50 * 448 / 240 - 28)) <= 1 and abs(ys.max().item() + 1 - (130 * 448 / 240 - 28)) <= 1
    assert abs(xs.min().item() - (190 * 448 / 320 - 28)) <= 1 and abs(xs.max().item() + 1 - (250 * 448 / 320 - 28)) <= 1


def test_normal_test_images_have_all_zero_masks(tmp_path):
    root = mvtec_tree(tmp_path, ("bottle",))
    ds = data.test_set("mvtec", root, "bottle", **SMALL)
    for item in ds:
        assert item["mask"].shape == (1, 56, 56)
        assert (item["mask"].sum() > 0) == bool(item["label"])
        assert item["cls"] == "bottle" and item["path"].endswith(".png")


def test_texture_ad_fixture():
    root = shared("fixtures", "texture_ad")
    assert data.list_classes("folder", root) == ["brick", "grass"]
    for cls in ("brick", "grass"):
        train = data.list_samples("folder", root, cls, "train")
        test = data.list_samples("folder", root, cls, "test")
        assert len(train) == 60
        assert sum(s.label == 0 for s in test) == 20 and sum(s.label == 1 for s in test) == 40
        assert {s.defect for s in test} == {"good", "scratch", "patch", "stain", "hole"}
        data.check_samples(train + test)
        defects = data.ImageDataset([s for s in test if s.label], Geometry())
        for item in defects:                       # every defect survives resize and centre crop
            assert item["mask"].sum() > 0, item["path"]
            assert item["image"].shape == (3, 392, 392)


# ----------------------------------------------------------------------------------------------------------
# Training sets: unified, single class, super-multi-class, few-shot

def test_train_sets_single_unified_and_super_multi_class(tmp_path):
    a = mvtec_tree(tmp_path / "a", ("bottle", "carpet"))
    b = mvtec_tree(tmp_path / "b", ("bottle", "tiles", "wood"))
    assert len(data.train_set("mvtec", a, "bottle", **SMALL)) == 2
    assert len(data.train_set("mvtec", a, "all", **SMALL)) == 4
    both = data.train_set("mvtec,folder", f"{a},{b}", "all", **SMALL)
    assert len(both) == 10
    assert len(data.train_set("mvtec,folder", [a, b], "bottle,wood", **SMALL)) == 2 + 2 + 2
    item = both[9]
    assert item["image"].shape == (3, 56, 56) and item["label"] == 0 and item["cls"] == "wood"
    assert item["mask"].shape == (1, 56, 56) and item["mask"].sum() == 0
    with pytest.raises(data.DataError, match="unknown class 'nope'"):
        data.train_set("mvtec,folder", f"{a},{b}", "bottle,nope", **SMALL)
    with pytest.raises(data.DataError, match="as many comma-separated roots"):
        data.train_set("mvtec,folder", str(a), "all", **SMALL)


def test_few_shot_sampling_is_seeded_and_follows_the_official_draw(tmp_path):
    root = tmp_path
    for c in ("bottle", "carpet"):
        for i in range(8):
            write(root / c / "train" / "good" / f"{i:03d}.png", texture(i + (100 if c == "bottle" else 0)))
        write(root / c / "test" / "good" / "000.png", texture(0))
    ds = data.train_set("mvtec", root, "all", shots=2, seed=1, **SMALL)
    assert len(ds) == 2 * 2 * 22
    # One random.Random(seed) for all classes, in the official class order (carpet before bottle).
    rng = random.Random(1)
    expect = [s.image for c in ("carpet", "bottle")
              for s in rng.sample(data.list_samples("mvtec", root, c, "train"), 2)]
    assert ds.paths == expect
    again = data.train_set("mvtec", root, "all", shots=2, seed=1, **SMALL)
    assert again.paths == ds.paths and torch.equal(again[30]["image"], ds[30]["image"])
    assert data.train_set("mvtec", root, "all", shots=2, seed=7, **SMALL).paths != ds.paths
    item = ds[22]                      # the first view of the second shot is that shot's original image
    assert torch.equal(item["image"], data.load_image(ds.paths[1], **SMALL))
    assert item["label"] == 0 and item["mask"].sum() == 0 and item["cls"] == "carpet"
    with pytest.raises(data.DataError, match="8 training images, cannot draw 16 shots"):
        data.train_set("mvtec", root, "bottle", shots=16, **SMALL)


def test_few_shot_rotation_angles():
    # A small blob right of the centre; the official warp samples the input at R(angle) * output, so the blob
    # lands at R(-angle) * p (normalised coordinates, y pointing down).
    n = 64
    c = (torch.arange(n) + 0.5) / n * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    blob = torch.exp(-((xx - 0.4) ** 2 + yy ** 2) / (2 * 0.05 ** 2)).expand(3, n, n)
    views = data.few_shot_augment(blob)
    for k, a in enumerate([-math.pi / 4, -3 * math.pi / 16, -math.pi / 8, -math.pi / 16,
                           math.pi / 16, math.pi / 8, 3 * math.pi / 16, math.pi / 4]):
        w = views[1 + k, 0]
        centre = ((w * xx).sum() / w.sum()).item(), ((w * yy).sum() / w.sum()).item()
        assert abs(centre[0] - 0.4 * math.cos(a)) < 0.01 and abs(centre[1] + 0.4 * math.sin(a)) < 0.01, (k, centre)


def kornia_style_rotate(x, degrees):
    """kornia.geometry.rotate: about ((w-1)/2, (h-1)/2), matrix [[c, s], [-s, c]] in pixels, align_corners."""
    h, w = x.shape[-2:]
    a = math.radians(degrees)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    # Invert dst = M (src - c) + c to find where each output pixel samples from.
    dx, dy = xs - cx, ys - cy
    sx = math.cos(a) * dx - math.sin(a) * dy + cx
    sy = math.sin(a) * dx + math.cos(a) * dy + cy
    grid = torch.stack([sx / (w - 1) * 2 - 1, sy / (h - 1) * 2 - 1], -1)[None].float()
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="reflection", align_corners=True)[0]


def test_few_shot_augment_views():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 40)
    views = data.few_shot_augment(x)
    assert views.shape == (22, 3, 40, 40)
    assert torch.equal(views[0], x)
    for k in (1, 2, 3):
        assert torch.equal(views[18 + k], torch.rot90(x, k, dims=(-2, -1)))
        assert torch.allclose(views[18 + k], kornia_style_rotate(x, 90 * k), atol=1e-4)
    assert torch.equal(views[17], x.flip(-1))
    grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]          # on the normalised values, as kornia does
    assert all(torch.allclose(views[18][c], grey, atol=1e-6) for c in range(3))
    # Translation (0.2, 0.2) in normalised coordinates samples 10% of the side further on: 4 pixels here.
    assert torch.allclose(views[9][:, :30, :30], x[:, 4:34, 4:34], atol=1e-5)
    const = torch.full((3, 40, 40), 0.7)
    assert torch.allclose(data.few_shot_augment(const), const.expand(22, -1, -1, -1), atol=1e-6)


def test_default_root():
    assert data.default_root("demo") == str(ROOT / "demo_data")
    assert data.default_root("mvtec") is None


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, naming the file

def truncate(path, keep=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


def bad_trees(tmp_path):
    """(name, how to trigger, the path the message must name)."""
    root = mvtec_tree(tmp_path / "mvtec", ("bottle",))
    cases = [("missing root", lambda: data.list_classes("mvtec", tmp_path / "nowhere"), tmp_path / "nowhere"),
             ("missing class folder", lambda: data.list_samples("mvtec", root, "cable", "test"), root / "cable"),
             ("unknown class", lambda: data.resolve_classes("mvtec", root, "bottle,cable"), root)]
    empty = mvtec_tree(tmp_path / "empty", ("bottle",))
    for p in (empty / "bottle" / "train" / "good").iterdir():
        p.unlink()
    cases.append(("empty class", lambda: data.list_samples("mvtec", empty, "bottle", "train"),
                  empty / "bottle" / "train" / "good"))
    nomask = mvtec_tree(tmp_path / "nomask", ("bottle",))
    (nomask / "bottle" / "ground_truth" / "hole" / "000_mask.png").unlink()
    cases.append(("image without mask", lambda: data.list_samples("mvtec", nomask, "bottle", "test"),
                  nomask / "bottle" / "test" / "hole" / "000.png"))
    return cases


def sample_cases(tmp_path):
    """Per-file problems: (name, samples, bad path); found by check_samples and by the loader alike."""
    out = []
    png = write(tmp_path / "trunc" / "000.png", texture(0, 64, 64))
    truncate(png)
    out.append(("truncated png", [data.Sample(str(png), None, 0, "c", "good")], png))
    jpg = write(tmp_path / "trunc" / "001.jpg", texture(0, 64, 64), "JPEG")
    truncate(jpg, 0.7)
    out.append(("truncated jpeg", [data.Sample(str(jpg), None, 0, "c", "good")], jpg))
    fake = tmp_path / "fake" / "000.png"
    fake.parent.mkdir()
    fake.write_text("<html>404 Not Found</html>")
    out.append(("not an image", [data.Sample(str(fake), None, 0, "c", "good")], fake))
    image = write(tmp_path / "size" / "000.png", texture(0))
    mask = write(tmp_path / "size" / "000_mask.png", square_mask(h=40, w=40))
    out.append(("mask size mismatch", [data.Sample(str(image), str(mask), 1, "c", "d")], mask))
    gone = tmp_path / "gone.png"
    out.append(("file vanished", [data.Sample(str(gone), None, 0, "c", "good")], gone))
    return out


def assert_names(err, path):
    msg = train.one_line(err)
    assert "\n" not in str(err) and str(path) in msg, msg


def test_layout_problems_raise_one_line_naming_the_path(tmp_path):
    for name, trigger, path in bad_trees(tmp_path):
        with pytest.raises(data.DataError) as e:
            trigger()
        assert_names(e.value, path)
    with pytest.raises(data.DataError, match=r"known: bottle\)"):
        data.resolve_classes("mvtec", tmp_path / "mvtec", "bottle,cable")


def test_file_problems_are_found_before_training_and_by_the_loader(tmp_path):
    for name, samples, path in sample_cases(tmp_path):
        with pytest.raises(data.DataError) as e:
            data.check_samples(samples)
        assert_names(e.value, path)
        with pytest.raises(data.DataError) as e:
            data.ImageDataset(samples, **SMALL)[0]
        assert_names(e.value, path)
    good = data.Sample(str(write(tmp_path / "ok.jpg", texture(0), "JPEG")), None, 0, "c", "good")
    data.check_samples([good])
    with open(good.image, "ab") as f:                 # bytes after the end marker: still a valid image
        f.write(b"\0" * 4096)
    data.check_samples([good])


def test_train_set_checks_files_before_training(tmp_path):
    root = mvtec_tree(tmp_path, ("bottle",))
    bad = root / "bottle" / "train" / "good" / "001.png"
    truncate(bad)
    with pytest.raises(data.DataError) as e:
        data.train_set("mvtec", root, "all", **SMALL)
    assert_names(e.value, bad)


def test_loader_worker_error_comes_back_as_one_line(tmp_path):
    (name, samples, path), = [c for c in sample_cases(tmp_path) if c[0] == "truncated png"]
    batches = iter(torch.utils.data.DataLoader(data.ImageDataset(samples, **SMALL), num_workers=1))
    try:
        next(batches)
    except data.DataError as e:        # re-raised in this process as the same type
        text, msg = str(e), train.one_line(e)
        # The traceback holds the iterator in a reference cycle; freed later by the garbage collector, its
        # worker shutdown waits out a 5 s timeout. Dropping the traceback lets `del` stop the worker at once.
        e.__traceback__ = None
    del batches
    assert "\n" in text                               # PyTorch wraps it in the worker's traceback...
    assert msg.startswith(f"{path}: cannot read image") and "\n" not in msg   # ...one_line unwraps it


def test_cli_check_and_exit_status(tmp_path, capsys):
    root = mvtec_tree(tmp_path / "ok", ("bottle",))
    assert data.main(["--check", "mvtec", str(root)]) == 0
    assert "bottle: train 2, test 1 good + 2 defective (crack 1, hole 1)" in capsys.readouterr().out
    missing = tmp_path / "nowhere"
    run = subprocess.run([sys.executable, str(ROOT / "data.py"), "--check", "mvtec", str(missing)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and str(missing) in run.stderr and "Traceback" not in run.stderr


def test_one_line_of_plain_and_wrapped_errors():
    assert train.one_line(data.DataError("a.png: broken")) == "a.png: broken"
    wrapped = data.DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"x.py\", line 1\n    raise\ndata.DataError: a.png: broken\n")
    assert train.one_line(wrapped) == "a.png: broken"
    assert train.one_line(RuntimeError("x\nValueError: boom")) == "ValueError: boom"


# ----------------------------------------------------------------------------------------------------------
# The training images decoded once

def store_tree(root, kind):
    """Three training images of one class: RGB, grey, 16-bit grey, or a mix of grey and colour and of 8 and 16
    bits; each a different size, as line frames are."""
    folder = root / "part" / "train" / "good"
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate([(48, 40), (61, 83), (50, 50)]):
        rgb = texture(i, h, w).astype(np.uint8)
        grey = rgb[..., 0]
        wide = grey.astype(np.uint16) * 257 + np.uint16(i)
        images = {"rgb": Image.fromarray(rgb), "grey": Image.fromarray(grey), "16-bit": Image.fromarray(wide),
                  "mixed": [Image.fromarray(rgb), Image.fromarray(grey), Image.fromarray(wide)][i]}
        images[kind].save(folder / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("budget", [data.STORE_IN_MEMORY, 0], ids=["in-memory", "file"])
@pytest.mark.parametrize("kind,recorded", [
    ("rgb", {"image_size": [72, 72], "crop_size": [63, 63]}),
    ("grey", {"image_size": [72, 72], "crop_size": [63, 63]}),
    ("16-bit", {"image_size": [72, 72], "crop_size": [63, 63], "bit_depth": 16}),
    ("mixed", {"image_size": [72, 72], "crop_size": [63, 63], "bit_depth": 16}),
    ("rgb", {"image_size": [42, 70], "crop_size": None}),  # a whole frame, 42 rows by 70 columns
])
def test_the_image_store_gives_the_loaders_images_bit_for_bit(tmp_path, kind, recorded, budget):
    root = store_tree(tmp_path / "data", kind)
    dataset = data.train_set("folder", root, "all", data.geometry_of(recorded))
    lines = []
    store = data.image_store(dataset, tmp_path / "run" / "image_cache", workers=0, log=lines.append, budget=budget)
    loader = torch.utils.data.DataLoader(store, batch_sampler=[[2, 0], [1]], collate_fn=store.collate)
    batches = [data.normalise(b) for b in loader]
    stored = torch.cat([batches[0][1:], batches[1], batches[0][:1]])  # items 0, 1, 2
    expected = torch.stack([dataset[i]["image"] for i in range(3)])
    assert stored.dtype == torch.float32 and torch.equal(stored, expected)
    if kind == "rgb" and recorded["crop_size"]:  # and the official transform's own torch operations
        assert torch.equal(stored[1], reference_pipeline(dataset.samples[1].image, 72, 63))
    where = "in memory" if budget else f"at {tmp_path / 'run' / 'image_cache' / 'images.bin'}"
    assert lines[-1].startswith(f"image cache: 3 images, 0.00 GiB, {where}")
    assert store.pixels.dtype == (torch.float32 if kind in ("16-bit", "mixed") else torch.uint8)
    assert store.pixels.shape[1] == (1 if kind in ("grey", "16-bit") else 3)


def test_a_stale_image_store_is_made_again(tmp_path):
    root = store_tree(tmp_path / "data", "rgb")
    dataset = data.train_set("folder", root, "all", Geometry(72, 63))
    folder, lines = tmp_path / "run" / "image_cache", []
    data.image_store(dataset, folder, log=lines.append, budget=0)
    data.image_store(dataset, folder, log=lines.append, budget=0)
    assert lines[-1].endswith("(reused)")
    changed = dataset.samples[1].image
    Image.fromarray(texture(7, 61, 83).astype(np.uint8)).save(changed)  # a file replaced in place
    dataset = data.train_set("folder", root, "all", Geometry(72, 63))
    store = data.image_store(dataset, folder, log=lines.append, budget=0)
    assert "was made from other files or settings; making it again" in lines[-2]
    assert torch.equal(data.normalise(store.__getitems__([1]))[0], dataset[1]["image"])
    with open(folder / "images.bin", "r+b") as f:  # a file cut short under its record: made again
        f.truncate(100)
    data.image_store(dataset, folder, log=lines.append, budget=0)
    assert "decoded in" in lines[-1]
    (folder / "store.json").unlink()  # a store cut short before its record: made again, not trusted
    data.image_store(dataset, folder, log=lines.append, budget=0)
    assert "decoded in" in lines[-1]
    data.image_store(data.train_set("folder", root, "all", Geometry(80, 63)), folder, log=lines.append, budget=0)
    assert "making it again" in lines[-2]  # another geometry
