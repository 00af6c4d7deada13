"""Data for INP-Former: MVTec AD, VisA, Real-IAD, any MVTec-layout folder, and a built-in demo set.

The data sets are read exactly as their authors distribute them, and every image goes through the official
INP-Former preprocessing (luow23/INP-Former `dataset.py`): RGB, 448x448 bilinear resize (aspect not kept),
centre crop 392, ImageNet mean/std. Masks take the same geometry and are then binarised at 0.5.

Layouts (`data` name -> what `root` points at):
  mvtec, folder, demo   <root>/<class>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}
  visa                  the raw download with split_csv/1cls.csv, or the prepared 1cls/<class>/... tree
  realiad               the folder holding realiad_1024/<class>/ and realiad_jsons/[realiad_jsons/]<class>.json

Every problem with the files on disk raises DataError, whose message is one line, "<path>: <problem>".

    python data.py --make-demo DIR          # write the procedural demo set (MVTec layout) in seconds
    python data.py --check mvtec ROOT       # class counts and a quick file check; exit 2 with one line if bad
"""
import argparse
import collections
import contextlib
import csv
import json
import math
import os
import random
import re
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import inpformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Class orders as the official training scripts list them (`item_list`); results are reported in this order.
MVTEC_CLASSES = ("carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
                 "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper")
VISA_CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                "pcb3", "pcb4", "pipe_fryum")
REALIAD_CLASSES = ("audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts",
                   "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator",
                   "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy",
                   "toy_brick", "transistor1", "usb", "usb_adaptor", "u_block", "vcpill", "wooden_beads",
                   "woodstick", "zipper")
OFFICIAL_ORDER = {"mvtec": MVTEC_CLASSES, "visa": VISA_CLASSES, "realiad": REALIAD_CLASSES}

DATASETS = ("mvtec", "visa", "realiad", "folder", "demo")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
HF_WEIGHTS = "https://huggingface.co/facebook/dinov2-with-registers-{size}/resolve/main/model.safetensors"
WIDTHS = {"small": 384, "base": 768, "large": 1024}  # the DINOv2 sizes --backbone can download

class DataError(ValueError):
    """A problem with the data on disk. str(e) is one line: "<path>: <problem>"."""

def _error(path, problem) -> DataError:
    # Library messages (PIL, json) can span lines; the one-line promise is what lets scripts print them as is.
    return DataError(re.sub(r"\s*\n\s*", " ", f"{path}: {problem}"))

def one_line(exc: BaseException) -> str:
    """The one-line message of `exc`, also when a DataLoader worker re-raised it with the worker's whole
    traceback as the message: the original message is its last line, after the exception's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return re.sub(r"^(?:[\w.]+\.)?DataError: ", "", lines[-1]) if len(lines) > 1 else lines[0]

@dataclass
class Sample:
    image: str
    mask: str | None      # None: a normal or training image (all-zero mask), or any image of an image-only class
    label: int            # 0 normal, 1 anomalous
    cls: str
    defect: str           # "good" for normal images
    # How a stored mask becomes 0/255 before resizing: None keeps its grey values (0/255 masks, read exactly
    # as the official loader reads them); an integer t marks a pixel anomalous where its value > t.
    mask_threshold: int | None = None

# ----------------------------------------------------------------------------------------------------------
# Layouts: where each data set keeps its classes, images and masks.

def default_root(data: str) -> str | None:
    """The folder used when no root is given: the demo set lives beside this file; real data sets need one."""
    return str(Path(__file__).resolve().parent / "demo_data") if data == "demo" else None

@dataclass
class _Layout:
    base: Path                      # MVTec-layout class folders; the raw VisA root; or Real-IAD's realiad_1024
    split_file: Path | None = None  # raw VisA: split_csv/1cls.csv
    jsons: Path | None = None       # Real-IAD: the folder of <class>.json files

def _source(data: str, root) -> _Layout:
    """Where a data set root keeps its classes, after checking that it exists. Reads, never writes."""
    if data not in DATASETS:
        raise _error(data, f"unknown data set (known: {', '.join(DATASETS)})")
    root = root or default_root(data)
    if not root:
        raise _error(data, "no data root given (pass --data-root)")
    root = Path(root)
    if not root.is_dir():
        hint = "; make it with: python data.py --make-demo DIR" if data == "demo" else ""
        raise _error(root, ("data root not found" if not root.exists() else "data root is not a folder") + hint)

    if data == "visa":
        # The split file ships inside the raw download (split_csv/1cls.csv); the prepared tree is what the
        # official preparation script writes from it. Prefer the split file: it is the source of truth.
        for split_file in (root / "split_csv" / "1cls.csv", root / "1cls.csv"):
            if split_file.is_file():
                return _Layout(root, split_file=split_file)
        return _Layout(root / "1cls" if (root / "1cls").is_dir() else root)

    if data == "realiad":
        images = root / "realiad_1024"
        if not images.is_dir():
            raise _error(images, "not found (a Real-IAD root holds realiad_1024/<class>/ and realiad_jsons/)")
        # The download unpacks to a doubled folder, realiad_jsons/realiad_jsons/, beside variants such as
        # realiad_jsons_sv; accept it and a single realiad_jsons/ holding the <class>.json files directly.
        for jsons in (root / "realiad_jsons" / "realiad_jsons", root / "realiad_jsons"):
            if jsons.is_dir() and any(jsons.glob("*.json")):
                return _Layout(images, jsons=jsons)
        raise _error(root / "realiad_jsons", "no <class>.json files in realiad_jsons/realiad_jsons/ or realiad_jsons/")

    return _Layout(root)

def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

def images_in(folder: Path, pattern="*") -> list[Path]:
    """The image files in folder (pattern "**/*": and below it), sorted; hidden entries are skipped (they include
    macOS "._000.png" resource forks, which carry an image suffix but are not images)."""
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))

def _read_split_file(split_file: Path) -> list[dict]:
    try:
        with open(split_file, newline="") as f:
            rows = list(reader := csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise _error(split_file, f"cannot read split file ({e})") from None
    need = ("object", "split", "label", "image", "mask")
    if not set(need) <= set(reader.fieldnames or ()):
        raise _error(split_file, f"not a VisA split file (its header must name {', '.join(need)})")
    return rows

def list_classes(data: str, root) -> list[str]:
    """The classes present under root: official order first where known, then sorted."""
    src = _source(data, root)
    base = src.base
    if src.split_file:
        found = {row["object"] for row in _read_split_file(src.split_file) if (base / row["object"]).is_dir()}
        expected = f"class folders named in {src.split_file.name}"
    elif src.jsons:
        # Real-IAD is distributed one zip per class: a class counts once its images are unpacked too.
        found = [j.stem for j in src.jsons.glob("*.json") if (base / j.stem).is_dir()]
        expected = f"realiad_1024/<class>/ folders for the json files in {src.jsons}"
    else:
        found = [d.name for d in _visible_dirs(base) if (d / "train" / "good").is_dir() or (d / "test").is_dir()]
        expected = "<class>/train/good and <class>/test folders"
        if data == "visa":
            expected = "split_csv/1cls.csv of the raw download, or the prepared 1cls/<class>/train/good tree"
    if not found:
        raise _error(base, f"no classes found (expected {expected})")
    official = OFFICIAL_ORDER.get(data, ())
    return [c for c in official if c in found] + sorted(set(found) - set(official))

def resolve_classes(data: str, root, spec) -> list[str]:
    """Classes for spec "all" (or None), "a,b,c" or a list of names; an unknown name is a DataError."""
    return resolve_sets(data, root, spec)[0][2]

def split_list(value) -> list[str]:
    """The items of a comma list ("a, b,c"), or of a list; empty ones dropped."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return [str(s).strip() for s in items if str(s).strip()]

def list_samples(data: str, root, cls: str, split: str) -> list[Sample]:
    """Every image of one class and split, paired with its mask; a DataError names what is missing."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    src = _source(data, root)
    if src.split_file:
        return _visa_csv_samples(src.base, src.split_file, cls, split)
    if src.jsons:
        return _realiad_samples(src.base, src.jsons, cls, split)
    return _tree_samples(src.base, cls, split, data, root)

def _tree_samples(base: Path, cls: str, split: str, data: str, root) -> list[Sample]:
    cdir = base / cls
    if not cdir.is_dir():
        known = ""
        with contextlib.suppress(DataError):
            known = f" (known: {', '.join(list_classes(data, root))})"
        raise _error(cdir, "class folder not found" + known)
    top = cdir / "train" / "good" if split == "train" else cdir / "test"
    if not top.is_dir():
        raise _error(top, "folder not found")
    samples = []
    for folder in [top] if split == "train" else _visible_dirs(top):  # train/good is its own one "good" folder
        defect = folder.name
        if defect == "good":
            samples += [Sample(str(p), None, 0, cls, "good") for p in images_in(folder)]
            continue
        # Pair by file stem, not by sorted order as the official loader does: a missing mask then names its
        # image instead of silently shifting every later pair. MVTec names masks <stem>_mask.png, the prepared
        # VisA tree <stem>.png. A class without any ground_truth/ folder is image-only: no masks at all.
        gt = cdir / "ground_truth" / defect
        masks = {p.stem: p for p in images_in(gt)} if gt.is_dir() else {}
        for p in images_in(folder):
            mask = masks.get(p.stem + "_mask") or masks.get(p.stem)
            if mask is None and (cdir / "ground_truth").is_dir():
                raise _error(p, f"no mask (expected {gt / (p.stem + '_mask.png')})")
            samples.append(Sample(str(p), mask and str(mask), 1, cls, defect))
    if not samples:
        raise _error(top, f"no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples

def _visa_csv_samples(base: Path, split_file: Path, cls: str, split: str) -> list[Sample]:
    rows = _read_split_file(split_file)
    if not any(row["object"] == cls for row in rows):
        known = sorted({row["object"] for row in rows})
        raise _error(split_file, f"no rows for class {cls!r} (known: {', '.join(known)})")
    samples = []
    for line, row in enumerate(rows, start=2):
        if row["object"] != cls or row["split"] != split:
            continue
        image = base / row["image"]
        if not image.is_file():
            raise _error(image, f"not found (listed in {split_file}, line {line})")
        if row["label"] == "normal" or split == "train":
            samples.append(Sample(str(image), None, int(row["label"] != "normal"), cls, "good"))
            continue
        mask = base / row["mask"] if row["mask"] else None
        if mask is None or not mask.is_file():
            raise _error(image, f"no mask ({'none listed' if mask is None else f'{mask} not found'}; "
                                f"{split_file}, line {line})")
        # Raw VisA masks are class-index maps (0 background, 1..K defect ids): any non-zero pixel is anomalous,
        # as the official preparation script makes it before INP-Former reads them.
        samples.append(Sample(str(image), str(mask), 1, cls, "bad", mask_threshold=0))
    if not samples:
        raise _error(split_file, f"no {split} rows for class {cls!r}")
    return samples

def _realiad_samples(images: Path, jsons: Path, cls: str, split: str) -> list[Sample]:
    path = jsons / f"{cls}.json"
    if not path.is_file():
        known = sorted(j.stem for j in jsons.glob("*.json"))
        raise _error(path, f"not found (known: {', '.join(known)})")
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _error(path, f"cannot read Real-IAD json ({e})") from None
    records = records.get(split) if isinstance(records, dict) else None
    if not isinstance(records, list) or not records:
        raise _error(path, f"not a Real-IAD json with a '{split}' list of images")
    cdir = images / cls
    if not cdir.is_dir():
        raise _error(cdir, "class image folder not found (unpack the class's realiad_1024 zip here)")
    samples = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or not rec.get("image_path") or "anomaly_class" not in rec:
            raise _error(path, f"'{split}' entry {n} lacks image_path or anomaly_class")
        image = cdir / rec["image_path"]
        if not image.is_file():
            raise _error(image, f"not found (listed in {path})")
        # Each of the five camera views is its own record and is scored as its own image, as in the paper.
        label = int(rec["anomaly_class"] != "OK")
        if not label or split == "train":
            samples.append(Sample(str(image), None, label, cls, "good" if not label else str(rec["anomaly_class"])))
            continue
        mask = cdir / rec["mask_path"] if rec.get("mask_path") else None
        if mask is None or not mask.is_file():
            raise _error(image, f"no mask ({'none listed' if mask is None else f'{mask} not found'} in {path})")
        # The downsampled copies have soft mask edges; > 127 is ADEval's rule for them.
        samples.append(Sample(str(image), str(mask), 1, cls, str(rec["anomaly_class"]), mask_threshold=127))
    return samples

# ----------------------------------------------------------------------------------------------------------
# Pre-flight check: find bad files before training starts, without decoding every pixel.

# A truncated download or unpack loses the end marker. Reading a file's last bytes finds that at the cost of
# a header read; only files without the marker (or in formats without one) are decoded in full.
_END_MARKERS = {"PNG": b"IEND", "JPEG": b"\xff\xd9"}

@contextlib.contextmanager
def _reading(path):
    """Any failure to read one image file becomes a one-line DataError naming that file."""
    try:
        yield
    except FileNotFoundError:
        raise _error(path, "file not found") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for broken files
        raise _error(path, f"cannot read image ({e})") from None

def _probe(path) -> tuple[int, int]:
    """(width, height) of an image file; DataError if it is missing, not an image, or does not decode."""
    with _reading(path), Image.open(path) as im, open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 1024))  # the last 1 KiB holds the end marker of a complete file
        if (marker := _END_MARKERS.get(im.format)) is None or marker not in f.read():
            im.load()
        return im.size

def _size_error(mask, msize, image, size) -> DataError:
    return _error(mask, f"mask is {msize[0]}x{msize[1]} but its image {image} is {size[0]}x{size[1]}")

def check_samples(samples) -> None:
    """Quick pre-flight: every image and mask opens, is complete, and each mask matches its image's size."""
    for s in samples:
        size = _probe(s.image)
        if s.mask is not None and (msize := _probe(s.mask)) != size:
            raise _size_error(s.mask, msize, s.image, size)

# ----------------------------------------------------------------------------------------------------------
# The official preprocessing.

# Per-image arithmetic runs in numpy, single-threaded. With workers=0 it runs in the training process, where
# torch's intra-op threads compete for the cores; on a busy 2-core machine that made it 8x slower. The float32
# operations are those of ToTensor + Normalize, so the values are bit-identical.
_MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1)

def _open(path, keep=("RGB", "L"), other="RGB") -> Image.Image:
    """The decoded image, converted to `other` unless its mode is in `keep`."""
    with _reading(path), Image.open(path) as im:
        im.load()
        # For images this is the official .convert('RGB') (RGBA drops alpha, P maps to colours), except that
        # grey stays grey until after the resize: the same pixels for a third of the work.
        return im if im.mode in keep else im.convert(other)

def crop_offset(image_size: int, crop_size: int) -> int:
    """Where the centre crop starts in the resized image: torchvision CenterCrop's rounding."""
    return int(round((image_size - crop_size) / 2.0))

def crop_box(width, height, image_size: int, crop_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop in an original width x height image's pixels, rounded
    (the resize to image_size x image_size does not keep the aspect)."""
    o, sx, sy = crop_offset(image_size, crop_size), width / image_size, height / image_size
    return round(o * sx), round(o * sy), round((o + crop_size) * sx), round((o + crop_size) * sy)

def _geometry(im: Image.Image, image_size: int, crop_size: int) -> Image.Image:
    # PIL's bilinear resize (antialiased when shrinking) is what torchvision's Resize runs on PIL images.
    im = im.resize((image_size, image_size), Image.BILINEAR)
    top = crop_offset(image_size, crop_size)
    return im.crop((top, top, top + crop_size, top + crop_size))

def _to_tensor(im: Image.Image, image_size: int, crop_size: int) -> torch.Tensor:
    im = _geometry(im, image_size, crop_size).convert("RGB")
    x = np.asarray(im).transpose(2, 0, 1).astype(np.float32, order="C")
    return torch.from_numpy((x / np.float32(255) - _MEAN) / _STD)

def load_image(path, image_size: int = 448, crop_size: int = 392) -> torch.Tensor:
    """One preprocessed image (3, crop, crop) from a file or a PIL image; DataError on a bad file."""
    check_sizes(image_size, crop_size)
    return _to_tensor(path if isinstance(path, Image.Image) else _open(path), image_size, crop_size)

def check_sizes(image_size: int, crop_size: int, patch_size: int = 1):
    """The one rule for --image-size/--crop-size: the crop is a positive multiple of the model's patch size
    and at most the image size."""
    if crop_size < patch_size or crop_size % patch_size:
        raise ValueError(f"--crop-size {crop_size} must be a multiple of the model's patch size {patch_size} "
                         f"(e.g. {max(crop_size // patch_size, 1) * patch_size})")
    if crop_size > image_size:
        raise ValueError(f"--crop-size {crop_size} must be at most --image-size {image_size}")

class ImageDataset(torch.utils.data.Dataset):
    """Samples -> dict(image (3,c,c) normalised, mask (1,c,c) in {0,1}, label, path, cls). With native=True
    items also carry native_mask: bool (h, w), the mask at the original resolution cut to the crop box
    (batch them with collate, which keeps these as a list: sizes can differ)."""

    def __init__(self, samples, image_size: int = 448, crop_size: int = 392, native: bool = False):
        check_sizes(image_size, crop_size)
        self.samples, self.native, self.image_size, self.crop_size = list(samples), native, image_size, crop_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        im = _open(s.image)
        m = None if s.mask is None else _open(s.mask, keep=("L", "P"), other="L")
        if m is None:
            mask = torch.zeros(1, self.crop_size, self.crop_size)
        elif m.size != im.size:
            raise _size_error(s.mask, m.size, s.image, im.size)
        else:
            t = s.mask_threshold  # None: keep the grey values (a P mask's palette grey); else class ids > t
            m = m.convert("L") if t is None else Image.fromarray(np.where(np.asarray(m) > t, 255, 0).astype(np.uint8))
            mask = np.asarray(_geometry(m, self.image_size, self.crop_size)) > 127
            mask = torch.from_numpy(mask[None].astype(np.float32))
        item = dict(image=_to_tensor(im, self.image_size, self.crop_size), mask=mask, label=s.label, path=s.image,
                    cls=s.cls)
        if self.native:
            left, top, right, bottom = crop_box(*im.size, self.image_size, self.crop_size)
            cut = np.asarray(m or Image.new("L", im.size))[top:bottom, left:right] > 127
            item["native_mask"] = torch.from_numpy(cut)
        return item

    @staticmethod
    def collate(items):
        native = [item.pop("native_mask") for item in items if "native_mask" in item]
        return dict(torch.utils.data.default_collate(items), **({"native_mask": native} if native else {}))

# ----------------------------------------------------------------------------------------------------------
# Few-shot: the official 22-fold expansion of each shot (utils.augmentation), on normalised tensors.

_ROTATIONS = [-math.pi / 4, -3 * math.pi / 16, -math.pi / 8, -math.pi / 16,
              math.pi / 16, math.pi / 8, 3 * math.pi / 16, math.pi / 4]
_SHIFTS = [(0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1)]
_WARPS = [torch.tensor(m, dtype=torch.float32) for m in
          [[[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]] for a in _ROTATIONS]
          + [[[1, 0, a], [0, 1, b]] for a, b in _SHIFTS]]
N_AUGMENT = 1 + len(_WARPS) + 2 + 3

def _augment(x: torch.Tensor, j: int) -> torch.Tensor:
    """The j-th of the 22 views of x (3,H,W): original, 8 rotations, 8 translations, flip, grey, 3 quarter turns."""
    if j == 0:
        return x
    if j <= len(_WARPS):
        # Normalised coordinates, align_corners=False and reflection padding, as the official rot_img and
        # translation_img call affine_grid/grid_sample; a shift of 0.2 moves the content by 10% of the side.
        grid = F.affine_grid(_WARPS[j - 1][None], [1, *x.shape], align_corners=False)
        return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    j -= len(_WARPS)
    if j == 1:
        return x.flip(-1)
    if j == 2:
        # kornia's rgb_to_grayscale weights, applied (as in the official code) to the normalised tensor.
        return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, -1, -1)
    # kornia.rotate by 90/180/270 degrees about the centre of a square image lands exactly on the pixel grid,
    # so it is torch.rot90 (counter-clockwise) up to float rounding.
    return torch.rot90(x, j - 2, dims=(-2, -1))

def few_shot_augment(x: torch.Tensor) -> torch.Tensor:
    """(3,H,W) -> (22,3,H,W): original, 8 rotations, 8 translations, hflip, grey, rot90 x3 (in this order;
    the official code shuffles them, which a shuffling DataLoader makes irrelevant)."""
    return torch.stack([_augment(x, j) for j in range(N_AUGMENT)])

class FewShotSet(torch.utils.data.Dataset):
    """k shots per class, each seen as its 22 views. Views are made on access from the preprocessed shots:
    the same tensors as the official offline expansion, at 1/22 of the memory (2.4 GB for MVTec 4-shot)."""

    def __init__(self, shots: torch.Tensor, samples):
        self.shots, self.paths, self.classes = shots, [s.image for s in samples], [s.cls for s in samples]

    def __len__(self):
        return len(self.paths) * N_AUGMENT

    def __getitem__(self, i):
        b, j = divmod(i, N_AUGMENT)
        x = self.shots[b]
        return dict(image=_augment(x, j).contiguous(), mask=torch.zeros(1, *x.shape[-2:]), label=0,
                    path=self.paths[b], cls=self.classes[b])

# ----------------------------------------------------------------------------------------------------------
# Training and test sets.

def resolve_sets(data, root, classes="all") -> list[tuple[str, str, list[str]]]:
    """[(data set, root, classes)] for data and root that may be comma lists ("mvtec,visa", "/d/mvtec,/d/visa",
    the super-multi-class setting): "all" means all classes of each set, and named classes are taken from
    every set that has them. A class no set knows is a DataError."""
    datas = split_list(data)
    roots = split_list(root) if isinstance(root, (str, list, tuple)) else [root] if root else []
    roots = roots or [default_root(d) for d in datas]
    if len(roots) != len(datas) or None in roots:
        raise _error(root or data, f"{len(datas)} data set(s) ({', '.join(datas)}) need as many comma-separated "
                                   "roots (--data-root)")
    known = [list_classes(d, r) for d, r in zip(datas, roots)]
    names = list(dict.fromkeys(split_list(classes)))
    if names and names != ["all"]:
        if unknown := [c for c in names if not any(c in k for k in known)]:
            raise _error(",".join(map(str, roots)), f"unknown class {', '.join(map(repr, unknown))} for "
                         f"{','.join(datas)} (known: {', '.join(dict.fromkeys(c for k in known for c in k))})")
        known = [[c for c in names if c in k] for k in known]
    return [(d, str(r), cs) for d, r, cs in zip(datas, roots, known) if cs]

def train_set(data, root, classes="all", image_size: int = 448, crop_size: int = 392, shots: int | None = None,
              seed: int = 1, check: bool = True) -> torch.utils.data.Dataset:
    """The training images of `classes` (single-class: one name; unified multi-class: "all") of the data sets
    of resolve_sets(data, root, classes). shots=k draws k images per class with one random.Random(seed) over the
    classes in order (the official setup_seed(1) + random.sample) and expands each into its 22 views.
    check=True runs check_samples first, so a bad file stops the run before training rather than inside a
    loader worker."""
    rng, chosen = random.Random(seed), []
    for d, r, clss in resolve_sets(data, root, classes):
        for cls in clss:
            samples = list_samples(d, r, cls, "train")
            if shots:
                if shots > len(samples):
                    raise _error(Path(samples[0].image).parent, f"{len(samples)} training images, "
                                                                f"cannot draw {shots} shots")
                samples = rng.sample(samples, shots)
            if check:
                check_samples(samples)
            chosen += samples
    ds = ImageDataset(chosen, image_size, crop_size)
    return FewShotSet(torch.stack([ds[i]["image"] for i in range(len(ds))]), chosen) if shots else ds

def test_set(data, root, cls, image_size: int = 448, crop_size: int = 392, check: bool = True,
             native: bool = False) -> ImageDataset:
    """All test images of one class with their masks (all-zero for normal images); native: see ImageDataset."""
    samples = list_samples(data, root, cls, "test")
    if check:
        check_samples(samples)
    return ImageDataset(samples, image_size, crop_size, native)

# ----------------------------------------------------------------------------------------------------------
# The demo data set: procedural textures with scratches, spots and chipped pieces, exact masks, seeded.

DEMO_MARKER = "demo.json"   # written last: a folder with it is a complete demo set
DEMO_DEFECTS = ("scratch", "spot", "missing")
_DEMO_COLOURS = {"tiles": (0.72, 0.46, 0.34), "fabric": (0.30, 0.38, 0.62)}   # terracotta, denim

def _texture(recipe: str, rng, size: int, colour: np.ndarray) -> np.ndarray:
    """A float RGB image in [0,1]: periodic structure at a random phase, smooth shading and fine grain, so that
    normal images differ while sharing a learnable pattern."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if recipe == "tiles":
        period = size / 8
        u, v = (x + rng.uniform(0, period)) / period, (y + rng.uniform(0, period)) / period
        tint = rng.normal(0, 0.05, (16, 16, 3)).astype(np.float32)[v.astype(int) % 16, u.astype(int) % 16]
        edge = np.minimum(np.minimum(u % 1, 1 - u % 1), np.minimum(v % 1, 1 - v % 1)) * period
        bevel = np.clip(edge / 4, 0, 1)[..., None]
        img = colour * (1 + tint) * (0.75 + 0.25 * bevel)
        img = np.where((edge < 1.5)[..., None], 0.38, img)          # grout lines
    else:  # "fabric": a plain weave, warp and weft threads alternating over and under
        period = size / 24
        u, v = (x + rng.uniform(0, 2 * period)) / period, (y + rng.uniform(0, 2 * period)) / period
        warp, weft = np.sin(np.pi * (u % 1)), np.sin(np.pi * (v % 1))
        over = (u.astype(int) + v.astype(int)) % 2 == 0
        img = colour * (0.55 + 0.45 * np.where(over, warp, weft))[..., None]
    coarse = Image.fromarray(rng.standard_normal((5, 5)).astype(np.float32), "F").resize((size, size), Image.BICUBIC)
    shade = 1 + 0.08 * np.asarray(coarse)[..., None] + rng.uniform(-0.04, 0.04)
    grain = rng.normal(0, 0.015, (size, size, 1)).astype(np.float32)
    return np.clip(img * shade + grain, 0, 1)

def _defect(kind: str, rng, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(defective image, 0/255 mask). Shapes are drawn without antialiasing, so the mask is exactly the set of
    pixels the defect replaced. Defects stay inside the central 60% so the 392/448 centre crop keeps them."""
    size = clean.shape[0]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    noise = rng.normal(0, 0.03, clean.shape).astype(np.float32)
    # Every defect shows a foreign colour. Dark, pale or grey fills looked like the tiles' grout or plain
    # interiors to some trained models and not to others, so the tiles' pixel AP swung by 7 to 20 points from
    # one --seed to the next; the random ViT's features separate colours reliably.
    fill = np.clip(1 - clean.reshape(-1, 3).mean(0) + rng.uniform(-0.15, 0.15, 3), 0, 1).astype(np.float32)
    if kind == "scratch":
        # A quadratic Bezier stroke through the surface, baring the layer beneath.
        length, angle = rng.uniform(0.15, 0.35) * size, rng.uniform(0, np.pi)
        d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
        p0, p2 = np.array([cx, cy]) - d, np.array([cx, cy]) + d
        p1 = (p0 + p2) / 2 + rng.normal(0, length / 4, 2)
        t = np.linspace(0, 1, 48)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        draw.line([tuple(p) for p in curve], fill=255, width=int(rng.integers(5, 9)) * size // 256 or 1)
    elif kind == "spot":
        # A blob of overlapping ellipses, a translucent stain.
        for _ in range(int(rng.integers(3, 6))):
            ox, oy = rng.normal(0, 0.03, 2) * size
            rx, ry = rng.uniform(0.025, 0.06, 2) * size
            draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
        fill = 0.35 * clean + 0.65 * fill
    else:  # "missing": an irregular polygonal chip, the layer beneath showing
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(7, 12))))
        radii = rng.uniform(0.04, 0.1, len(angles)) * size
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)], fill=255)
    mask = np.asarray(canvas)
    return np.where((mask > 0)[..., None], np.clip(fill + noise, 0, 1), clean), mask

def _save(path: Path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype != np.uint8:
        array = (array * 255 + 0.5).astype(np.uint8)
    Image.fromarray(array).save(path, compress_level=1)  # grain does not compress; level 1 encodes about 4x faster

def make_demo(out_dir, seed: int = 0, classes=("tiles", "fabric"), n_train: int = 72, n_test_good: int = 12,
              n_test_defect: int = 18, size: int = 256) -> Path:
    """Write a small MVTec-layout data set to out_dir (or keep it, if one with these settings is there).

    Per class: train/good, test/good, test/{scratch,spot,missing} (defects dealt round-robin) and
    ground_truth/<defect>/NNN_mask.png. Files depend only on the arguments (each image has its own seeded
    generator). Written to a temporary folder and moved in place, so an interrupted run never looks complete."""
    out = Path(out_dir)
    settings = dict(version=3, seed=seed, classes=list(classes), n_train=n_train, n_test_good=n_test_good,
                    n_test_defect=n_test_defect, size=size)
    if _demo_settings(out) == settings:
        return out
    if out.exists() and not (out / DEMO_MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise _error(out, "exists and is not a demo data set; not overwriting it")

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for ci, cls in enumerate(classes):
        # Other class names reuse the two recipes, in a colour of their own.
        recipe = cls if cls in _DEMO_COLOURS else tuple(_DEMO_COLOURS)[ci % 2]
        colour = np.float32(_DEMO_COLOURS[cls] if cls in _DEMO_COLOURS
                            else np.random.default_rng([seed, ci]).uniform(0.25, 0.8, 3))

        rng = lambda split, i: np.random.default_rng([seed, ci, split, i])  # noqa: E731 (one per image)
        for split, folder, n in ((0, "train", n_train), (1, "test", n_test_good)):
            for i in range(n):
                _save(tmp / cls / folder / "good" / f"{i:03d}.png", _texture(recipe, rng(split, i), size, colour))
        for i in range(n_test_defect):
            kind, n, g = DEMO_DEFECTS[i % len(DEMO_DEFECTS)], i // len(DEMO_DEFECTS), rng(2, i)
            image, mask = _defect(kind, g, _texture(recipe, g, size, colour))
            _save(tmp / cls / "test" / kind / f"{n:03d}.png", image)
            _save(tmp / cls / "ground_truth" / kind / f"{n:03d}_mask.png", mask)
    (tmp / DEMO_MARKER).write_text(json.dumps(settings, indent=1) + "\n")

    if _demo_settings(out) == settings:      # another process finished the same set meanwhile
        shutil.rmtree(tmp)
        return out
    if out.exists():
        shutil.rmtree(out)                   # an older demo set (it has the marker) or an empty folder
    os.replace(tmp, out)
    return out

def _demo_settings(folder: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / DEMO_MARKER).read_text())

def load_encoder(weights=None, backbone=None, demo=False, log=print):
    """train.py's encoder: --weights, else the demo's random ViT, else the DINOv2-with-registers file of
    --backbone (downloaded once into ~/.cache/inpformer or $INPFORMER_CACHE). Logs what it found."""
    if weights:
        vit = inpformer.load_backbone(weights)
        if backbone and WIDTHS[backbone] != vit.config.embed_dim:
            raise ValueError(f"--backbone {backbone} contradicts --weights {weights} (a {vit.config.embed_dim}"
                             "-wide ViT): drop --backbone, it only picks the file to download")
    elif demo:
        log("no --weights: using a small randomly initialised ViT (pass --weights for real DINOv2 features)")
        vit = demo_backbone()
    else:
        vit = inpformer.load_backbone(default_weights(backbone or "base", log))
    c = vit.config
    log(f"backbone: ViT {c.embed_dim} wide, {c.depth} blocks, {c.num_heads} heads, {c.num_register_tokens} "
        f"registers, patch {c.patch_size}, from {getattr(vit, 'source', 'code')} weights")
    return vit

def default_weights(backbone, log):
    cache = Path(os.environ.get("INPFORMER_CACHE", Path.home() / ".cache" / "inpformer"))
    path, url = cache / f"dinov2-with-registers-{backbone}.safetensors", HF_WEIGHTS.format(size=backbone)
    if path.is_file():
        return path
    log(f"downloading {url} to {path}")
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as r, inpformer.atomic_write(path) as tmp, open(tmp, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            while chunk := r.read(1 << 24):
                done += f.write(chunk)
                log(f"  {done >> 20} / {total >> 20} MiB")
    except OSError as e:
        raise ValueError(f"could not download the DINOv2 weights ({getattr(e, 'reason', e)}): download {url} and "
                         f"save it as {path}, or pass --weights PATH") from None
    return path

def demo_backbone():
    """The demo's encoder: a small randomly initialised ViT, so the demo runs with nothing downloaded. Random
    features still separate the demo's defects from its textures, though far less well than DINOv2's."""
    g = torch.Generator().manual_seed(0)  # the same backbone every run, whatever --seed
    vit = inpformer.ViT(inpformer.ViTConfig(embed_dim=128, depth=10, num_heads=2, num_register_tokens=0))
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):  # small layer scale: blocks refine the patch features, not scramble them
                p.fill_(0.1)
            elif p.ndim > 1 or name in ("cls_token", "pos_embed"):
                torch.nn.init.trunc_normal_(p, std=0.02, generator=g)
            elif name.endswith("bias"):
                p.zero_()
    torch.nn.init.kaiming_uniform_(vit.patch_embed.proj.weight, a=math.sqrt(5), generator=g)  # conv's default
    vit.source = "random (demo)"
    return vit

# ----------------------------------------------------------------------------------------------------------
# Command line: `python data.py`, and the pieces train.py and evaluate.py share (data flags, their checks,
# the device, and the one-line error guard).

class Parser(argparse.ArgumentParser):
    def error(self, message):  # a ValueError, so that guard() prints it as one line with exit status 2
        raise ValueError(f"{message} (see --help)")

def number(kind=int, low=1):
    """An argparse type: a whole number of at least `low`, or (kind=float) a finite number above `low`."""
    def parse(text):
        with contextlib.suppress(ValueError):
            v = kind(text)
            if v >= low if kind is int else math.isfinite(v) and v > low:
                return v
        raise argparse.ArgumentTypeError(f"{text!r} is not " + (f"a whole number of at least {low}" if kind is int
                                                                else f"a number above {low}"))
    return parse

def data_names(text):
    """An argparse type: a comma list of known data set names."""
    names = split_list(text)
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown data set {', '.join(map(repr, unknown)) or repr(text)} "
                                         f"(known: {', '.join(DATASETS)})")
    return ",".join(names)

def add_args(parser, required=False):
    """The data and device options of train.py and evaluate.py. Defaults are None: each script fills them in
    (evaluate.py from the checkpoint's metadata, train.py from the data set)."""
    g = parser.add_argument_group("data and device")
    g.add_argument("--data", type=data_names, required=required,
                   help=f"data set: {', '.join(DATASETS)}, or a comma list of them")
    g.add_argument("--data-root", help="folder holding the data set (comma list, one per --data; demo: demo_data/)")
    g.add_argument("--classes", help='"all" (default) or a comma list of class names')
    g.add_argument("--image-size", type=number(), help="side of the square resize before the centre crop (default 448)")
    g.add_argument("--crop-size", type=number(),
                   help="side of the centre crop fed to the model, a multiple of the patch size 14 (default 392)")
    g.add_argument("--batch-size", type=number(), help="images per batch (default 16)")
    g.add_argument("--workers", type=number(low=0), help="data-loading processes (default: up to 4, at most the CPUs)")
    g.add_argument("--device", help='"auto" (default: cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...')
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast dtype (auto: bf16 for CUDA training, else fp32; bf16 also runs on CPUs)")

def format_time(s) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

def workers(asked=None, default=4) -> int:
    """Loader processes: as asked, else up to `default`; never more than the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(default if asked is None else asked, cpus)

def device(name, precision=None) -> torch.device:
    """"auto" (or None) -> cuda if available, else cpu; anything else must name a device that is there."""
    try:
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name in (None, "auto") else name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and (dev.index or 0) >= (n := torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise ValueError(f"--device {name}: " + (f"only {n} CUDA device(s) here" if n else
                                                 "no CUDA device is available here (use --device cpu)"))
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError("--precision fp16 runs on CUDA only (use bf16 on a CPU)")
    return dev

def guard(main) -> None:
    """Run main(); bad input (a ValueError such as DataError or inpformer.WeightsError, or an OSError) ends with
    one line "error: ..." on stderr and exit status 2. INPFORMER_TRACEBACK=1 shows the traceback instead."""
    try:
        rc = main()
        sys.exit(rc if isinstance(rc, int) else 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        if os.environ.get("INPFORMER_TRACEBACK"):
            raise
        msg = "out of GPU memory; lower --batch-size" if isinstance(e, torch.cuda.OutOfMemoryError) else one_line(e)
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)
        sys.exit(2)

def _check(data: str, root, classes: str) -> None:
    start, files = time.perf_counter(), 0
    for cls in resolve_classes(data, root, classes):
        train, test = list_samples(data, root, cls, "train"), list_samples(data, root, cls, "test")
        check_samples(train + test)
        files += len(train) + len(test) + sum(s.mask is not None for s in test)
        defects = collections.Counter(s.defect for s in test if s.label)
        print(f"{cls}: train {len(train)}, test {len(test) - defects.total()} good + {defects.total()} defective "
              f"({', '.join(f'{d} {n}' for d, n in sorted(defects.items()))})")
    print(f"checked {files} files in {time.perf_counter() - start:.1f} s")

def main(argv=None) -> int:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--make-demo", metavar="DIR", help="write the demo data set (MVTec layout) to DIR")
    p.add_argument("--seed", type=int, default=0, help="demo set seed (default 0)")
    p.add_argument("--check", nargs=2, metavar=("DATA", "ROOT"),
                   help=f"count the classes of DATA ({', '.join(DATASETS)}) under ROOT and check every file")
    p.add_argument("--classes", default="all", help="with --check: 'all' or a comma list")
    args = p.parse_args(argv)
    if not args.make_demo and not args.check:
        p.error("give --make-demo DIR or --check DATA ROOT")
    if args.make_demo:
        print(f"demo data set in {make_demo(args.make_demo, seed=args.seed)}")
    if args.check:
        _check(*args.check, args.classes)
    return 0

if __name__ == "__main__":
    guard(main)
