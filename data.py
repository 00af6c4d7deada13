"""Data for INP-Former: the data sets as their authors distribute them, and the official preprocessing.

Data sets (`data` name -> what `root` points at):
  mvtec, folder, demo   <root>/<class>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}
  visa                  the raw download with split_csv/1cls.csv, or the prepared 1cls/<class>/... tree
  realiad               the folder holding realiad_1024/<class>/ and realiad_jsons/[realiad_jsons/]<class>.json
  mvtec2                MVTec AD 2: <root>/<class>/{train/good, validation/good, test_public/{good,bad}} and masks
                        test_public/ground_truth/bad/<stem>_mask.png
The official preprocessing is ResizeCrop's. A problem with the files on disk raises DataError, one line:
"<path>: <problem>".

    python data.py --check mvtec ROOT       # class counts and a quick check of every file; exit 2 with one line if bad
"""
import collections
import contextlib
import csv
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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
MVTEC2_CLASSES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
OFFICIAL_ORDER = {"mvtec": MVTEC_CLASSES, "visa": VISA_CLASSES, "realiad": REALIAD_CLASSES, "mvtec2": MVTEC2_CLASSES}

DATASETS = ("mvtec", "visa", "realiad", "mvtec2", "folder", "demo")
# The good images predict.py --calibrate uses: a data set's own validation split where it has one, else its
# test images.
CALIBRATION_SPLIT = {"mvtec2": "validation"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A problem with the data on disk. str(e) is one line: "<path>: <problem>"."""


def error(path, problem) -> DataError:
    # Library messages (PIL, json) can span lines; the one-line promise is what lets scripts print them as is.
    return DataError(re.sub(r"\s*\n\s*", " ", f"{path}: {problem}"))


@dataclass
class Sample:
    image: str
    mask: str | None      # None: a normal or training image (all-zero mask), or any image of an image-only class
    label: int            # 0 normal, 1 anomalous
    cls: str
    defect: str           # "good" for normal images
    # How a stored mask is read before resizing: None keeps its grey values (0/255 masks, and soft-edged ones,
    # resized as the official loader resizes them and then binarised at 0.5); an integer t marks a pixel
    # anomalous where its value > t (VisA's raw class-index masks, t = 0).
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
        raise error(data, f"unknown data set (known: {', '.join(DATASETS)})")
    root = root or default_root(data)
    if not root:
        raise error(data, "no data root given (pass --data-root)")
    root = Path(root)
    if not root.is_dir():
        hint = "; make it with: python demo.py DIR" if data == "demo" else ""
        raise error(root, ("data root not found" if not root.exists() else "data root is not a folder") + hint)

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
            raise error(images, "not found (a Real-IAD root holds realiad_1024/<class>/ and realiad_jsons/)")
        # The download unpacks to a doubled folder, realiad_jsons/realiad_jsons/, beside variants such as
        # realiad_jsons_sv; accept it and a single realiad_jsons/ holding the <class>.json files directly.
        for jsons in (root / "realiad_jsons" / "realiad_jsons", root / "realiad_jsons"):
            if jsons.is_dir() and any(jsons.glob("*.json")):
                return _Layout(images, jsons=jsons)
        raise error(root / "realiad_jsons", "no <class>.json files in realiad_jsons/realiad_jsons/ or realiad_jsons/")

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
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise error(split_file, f"cannot read split file ({e})") from None
    need = ("object", "split", "label", "image", "mask")
    if not set(need) <= set(reader.fieldnames or ()):
        raise error(split_file, f"not a VisA split file (its header must name {', '.join(need)})")
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
        test = "test_public" if data == "mvtec2" else "test"
        found = [d.name for d in _visible_dirs(base) if (d / "train" / "good").is_dir() or (d / test).is_dir()]
        expected = f"<class>/train/good and <class>/{test} folders"
        if data == "visa":
            expected = "split_csv/1cls.csv of the raw download, or the prepared 1cls/<class>/train/good tree"
    if not found:
        raise error(base, f"no classes found (expected {expected})")
    official = OFFICIAL_ORDER.get(data, ())
    return [c for c in official if c in found] + sorted(set(found) - set(official))


def resolve_classes(data: str, root, spec) -> list[str]:
    """The classes of one data set (data and root name one, not a comma list) for spec "all" (or None), "a,b,c"
    or a list of names; an unknown name is a DataError."""
    return resolve_sets(data, root, spec)[0][2]


def split_list(value) -> list[str]:
    """The items of a comma list ("a, b,c"), or of a list; empty ones dropped."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return [str(s).strip() for s in items if str(s).strip()]


def list_samples(data: str, root, cls: str, split: str) -> list[Sample]:
    """Every image of one class and split ("train", "test", or MVTec AD 2's "validation": good images for
    calibration), paired with its mask; a DataError names what is missing."""
    if split not in ("train", "test", "validation"):
        raise ValueError(f"split must be 'train', 'test' or 'validation', not {split!r}")
    if split == "validation" and data != "mvtec2":
        raise error(data, "has no validation split (MVTec AD 2 has)")
    src = _source(data, root)
    if data == "mvtec2":
        return _tree_samples(src.base, cls, split, data, root, test="test_public", gt="test_public/ground_truth")
    if src.split_file:
        return _visa_csv_samples(src.base, src.split_file, cls, split)
    if src.jsons:
        return _realiad_samples(src.base, src.jsons, cls, split)
    return _tree_samples(src.base, cls, split, data, root)


def _tree_samples(base: Path, cls: str, split: str, data: str, root, test="test", gt="ground_truth") -> list[Sample]:
    """The MVTec layout: <class>/train/good, <class>/<test>/<defect>, masks in <class>/<gt>/<defect>/."""
    cdir = base / cls
    if not cdir.is_dir():
        known = ""
        with contextlib.suppress(DataError):
            known = f" (known: {', '.join(list_classes(data, root))})"
        raise error(cdir, "class folder not found" + known)
    top = {"train": cdir / "train" / "good", "validation": cdir / "validation" / "good", "test": cdir / test}[split]
    if not top.is_dir():
        raise error(top, "folder not found")
    samples = []
    for folder in _visible_dirs(top) if split == "test" else [top]:  # train/good is its own one "good" folder
        defect = folder.name
        if defect == "good":
            samples += [Sample(str(p), None, 0, cls, "good") for p in images_in(folder)]
            continue
        # Pair by file stem, not by sorted order as the official loader does: a missing mask then names its
        # image instead of silently shifting every later pair. MVTec names masks <stem>_mask.png, the prepared
        # VisA tree <stem>.png. A class without any ground_truth/ folder is image-only: no masks at all.
        masks_dir = cdir / gt / defect
        masks = {p.stem: p for p in images_in(masks_dir)} if masks_dir.is_dir() else {}
        for p in images_in(folder):
            mask = masks.get(p.stem + "_mask") or masks.get(p.stem)
            if mask is None and (cdir / gt).is_dir():
                raise error(p, f"no mask (expected {masks_dir / (p.stem + '_mask.png')})")
            samples.append(Sample(str(p), mask and str(mask), 1, cls, defect))
    if not samples:
        raise error(top, f"no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def _visa_csv_samples(base: Path, split_file: Path, cls: str, split: str) -> list[Sample]:
    rows = _read_split_file(split_file)
    if not any(row["object"] == cls for row in rows):
        known = sorted({row["object"] for row in rows})
        raise error(split_file, f"no rows for class {cls!r} (known: {', '.join(known)})")
    samples = []
    for line, row in enumerate(rows, start=2):
        if row["object"] != cls or row["split"] != split:
            continue
        image = base / row["image"]
        if not image.is_file():
            raise error(image, f"not found (listed in {split_file}, line {line})")
        if row["label"] == "normal" or split == "train":
            samples.append(Sample(str(image), None, int(row["label"] != "normal"), cls, "good"))
            continue
        mask = base / row["mask"] if row["mask"] else None
        if mask is None or not mask.is_file():
            raise error(image, f"no mask ({'none listed' if mask is None else f'{mask} not found'}; "
                                f"{split_file}, line {line})")
        # Raw VisA masks are class-index maps (0 background, 1..K defect ids): any non-zero pixel is anomalous,
        # as the official preparation script makes it before INP-Former reads them.
        samples.append(Sample(str(image), str(mask), 1, cls, "bad", mask_threshold=0))
    if not samples:
        raise error(split_file, f"no {split} rows for class {cls!r}")
    return samples


def _realiad_samples(images: Path, jsons: Path, cls: str, split: str) -> list[Sample]:
    path = jsons / f"{cls}.json"
    if not path.is_file():
        known = sorted(j.stem for j in jsons.glob("*.json"))
        raise error(path, f"not found (known: {', '.join(known)})")
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(path, f"cannot read Real-IAD json ({e})") from None
    records = records.get(split) if isinstance(records, dict) else None
    if not isinstance(records, list) or not records:
        raise error(path, f"not a Real-IAD json with a '{split}' list of images")
    cdir = images / cls
    if not cdir.is_dir():
        raise error(cdir, "class image folder not found (unpack the class's realiad_1024 zip here)")
    samples = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or not rec.get("image_path") or "anomaly_class" not in rec:
            raise error(path, f"'{split}' entry {n} lacks image_path or anomaly_class")
        image = cdir / rec["image_path"]
        if not image.is_file():
            raise error(image, f"not found (listed in {path})")
        # Each of the five camera views is its own record and is scored as its own image, as in the paper.
        label = int(rec["anomaly_class"] != "OK")
        if not label or split == "train":
            samples.append(Sample(str(image), None, label, cls, "good" if not label else str(rec["anomaly_class"])))
            continue
        mask = cdir / rec["mask_path"] if rec.get("mask_path") else None
        if mask is None or not mask.is_file():
            raise error(image, f"no mask ({'none listed' if mask is None else f'{mask} not found'} in {path})")
        # The downsampled copies have soft mask edges. They keep their grey values through the resize and are
        # binarised once after it (> 0.5 of 255), as the official loader does; --full-res cuts the native mask at
        # > 127, the rule of ADEval (the official code's evaluation package) for them.
        samples.append(Sample(str(image), str(mask), 1, cls, str(rec["anomaly_class"])))
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
    except DataError:  # already one line naming the file
        raise
    except FileNotFoundError:
        raise error(path, "file not found") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for broken files
        raise error(path, f"cannot read image ({e})") from None


def _probe(path) -> tuple[int, int]:
    """(width, height) of an image file; DataError if it is missing, not an image, or does not decode."""
    with _reading(path), Image.open(path) as im:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 1024))  # the last 1 KiB holds the end marker of a complete file
            tail = f.read()
        marker = _END_MARKERS.get(im.format)
        if marker is None or marker not in tail:
            im.load()
        return im.size


def _size_error(mask, msize, image, size) -> DataError:
    return error(mask, f"mask is {msize[0]}x{msize[1]} but its image {image} is {size[0]}x{size[1]}")


def check_samples(samples) -> None:
    """Quick pre-flight: every image and mask opens, is complete, and each mask matches its image's size."""
    for s in samples:
        size = _probe(s.image)
        if s.mask is None:
            continue
        mask_size = _probe(s.mask)
        if mask_size != size:
            raise _size_error(s.mask, mask_size, s.image, size)

# ----------------------------------------------------------------------------------------------------------
# The official preprocessing.


# Per-image arithmetic runs in numpy, single-threaded. With workers=0 it runs in the training process, where
# torch's intra-op threads compete for the cores; on a busy 2-core machine that made it 8x slower. The float32
# operations are those of ToTensor + Normalize, so the values are bit-identical.
_MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1)


# Pixel formats. 8-bit RGB and grey are read as they are; palette, alpha, CMYK, YCbCr and bilevel images become
# RGB as the official .convert('RGB') makes them; 16-bit, 32-bit integer and float grey images (industrial
# cameras) are read by line/pixels.py.
_CONVERTED = ("P", "PA", "RGBA", "RGBa", "RGBX", "LA", "La", "CMYK", "YCbCr", "1")
WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _open(path, bit_depth=None) -> Image.Image:
    """An image file decoded to "RGB" or "L" (8-bit), or to "F" (grey in [0, 1]) from a wider grey format."""
    with _reading(path), Image.open(path) as im:
        im.load()
        return _model_mode(im, path, bit_depth)


def _model_mode(im, path, bit_depth=None) -> Image.Image:
    """A decoded image in a mode the preprocessing takes (see _open); `path` names it in errors."""
    if im.mode in ("RGB", "L"):
        # Grey stays grey until after the resize: the same pixels as .convert('RGB') first, at a third of the work.
        return im
    if im.mode in _CONVERTED:
        return im.convert("RGB")
    if im.mode in WIDE_GREY:
        from line.pixels import wide_grey

        return wide_grey(path, im, bit_depth)
    raise error(path, f"pixel format {im.mode!r} is not supported (RGB, grey, palette, alpha, 16-bit or float grey)")


def _open_mask(path) -> Image.Image:
    """A mask file as 8-bit grey (a palette mask's palette grey, a 16-bit one clipped to 255: still > 127)."""
    with _reading(path), Image.open(path) as im:
        im.load()
        return im if im.mode in ("L", "P") else im.convert("L")


@dataclass(frozen=True)
class ResizeCrop:
    """The official preprocessing's sizes (luow23/INP-Former dataset.py), (height, width) or n for (n, n). An image
    is resized bilinearly to image_size (the aspect not kept), cut to its centre crop_size and normalised with
    ImageNet's mean and std: the model's input. Masks take the same resize and crop, then > 0.5. The line layer's
    Geometry (line/geometry.py) adds whole frames, tiles and bit depths; geometry_of() picks the one a model
    records."""
    image_size: tuple = tuple(inpformer.PAPER_GEOMETRY["image_size"])
    crop_size: tuple = tuple(inpformer.PAPER_GEOMETRY["crop_size"])
    tile = None  # never tiled, and 8-bit (the fields Geometry sets)
    bit_depth = None

    def __post_init__(self):
        for name in ("image_size", "crop_size"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value, value)
            object.__setattr__(self, name, tuple(int(v) for v in value) if value is not None else None)

    def to_dict(self) -> dict:
        """The plain data a model's config records (config.geometry)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check(self, patch_size=14):
        """The one rule for the sizes; raises ValueError naming the flag. Returns the geometry."""
        check_multiple("--crop-size", self.crop_size, patch_size)
        if any(c > i for c, i in zip(self.crop_size, self.image_size)):
            raise ValueError(f"--crop-size {hw(self.crop_size)} must be at most --image-size {hw(self.image_size)}")
        return self

    def frame_size(self, height, width) -> tuple:
        """(height, width) of the resized frame of an original height x width image."""
        return self.image_size

    def crop_box(self, frame_height, frame_width) -> tuple:
        """(top, left, height, width) of the model's input in the resized frame (torchvision CenterCrop's
        rounding)."""
        h, w = self.crop_size
        return int(round((frame_height - h) / 2.0)), int(round((frame_width - w) / 2.0)), h, w

    def input_size(self) -> tuple:
        return self.crop_size

    def describe(self) -> str:
        return f"{hw(self.image_size)} -> {hw(self.crop_size)} px"


def geometry_of(recorded) -> ResizeCrop:
    """The preprocessing a recorded geometry (a model's config.geometry, a dict) asks for: the paper's resize and
    crop, or the line layer's Geometry for what the paper does not do (whole frames, tiles, a bit depth)."""
    recorded = dict(recorded)
    if recorded.get("crop_size") and recorded.get("image_size") and not recorded.get("tile") \
            and recorded.get("bit_depth") is None:
        return ResizeCrop(recorded["image_size"], recorded["crop_size"])
    from line.geometry import Geometry

    return Geometry(**recorded)


def check_multiple(flag, size, patch_size, why=""):
    """A ValueError naming `flag` unless every side of `size` is a multiple of the patch size."""
    if any(n < patch_size or n % patch_size for n in size):
        suggestion = hw([max(n // patch_size, 1) * patch_size for n in size])
        raise ValueError(f"{flag} {hw(size)} must be a multiple of the model's patch size {patch_size}{why} "
                         f"(e.g. {suggestion})")


def hw(size) -> str:
    """448 for (448, 448), 350x140 for (350, 140): sizes as the command line writes them."""
    if isinstance(size, int):
        return str(size)
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def crop_box(width, height, geometry: ResizeCrop) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the model's input in an original width x height image's pixels, rounded:
    the centre crop of the resized frame (the resize need not keep the aspect), or the whole image."""
    frame_h, frame_w = geometry.frame_size(height, width)
    top, left, h, w = geometry.crop_box(frame_h, frame_w)
    sx, sy = width / frame_w, height / frame_h
    return round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy)


def _resize_and_crop(im: Image.Image, geometry: ResizeCrop) -> Image.Image:
    """The frame at the geometry's size, then its crop (the whole frame without one)."""
    height, width = geometry.frame_size(im.height, im.width)
    # PIL's bilinear resize (antialiased when shrinking) is what torchvision's Resize runs on PIL images.
    if (width, height) != im.size:
        im = im.resize((width, height), Image.BILINEAR)
    top, left, h, w = geometry.crop_box(height, width)
    if (top, left, h, w) != (0, 0, height, width):
        im = im.crop((left, top, left + w, top + h))
    return im


def _pixels(im: Image.Image, geometry: ResizeCrop) -> np.ndarray:
    """The resized and cropped image before normalisation: (3, h, w) uint8 for colour, (1, h, w) uint8 for grey,
    (1, h, w) float32 in [0, 1] for wide grey."""
    im = _resize_and_crop(im, geometry)
    if im.mode == "F":
        return np.asarray(im, np.float32)[None]
    if im.mode == "L":
        return np.asarray(im)[None]
    return np.asarray(im).transpose(2, 0, 1)


def _to_tensor(im: Image.Image, geometry: ResizeCrop) -> torch.Tensor:
    x = _pixels(im, geometry)
    if x.dtype == np.uint8:
        x = x.astype(np.float32, order="C") / np.float32(255)
    if len(x) == 1:  # grey: the three equal channels of .convert('RGB')
        x = np.repeat(x, 3, axis=0)
    return torch.from_numpy((x - _MEAN) / _STD)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """Stored pixels (B, C, h, w) (see _pixels; the training image store) -> the model's input, float32, on their
    device: the operations of _to_tensor in its order, so the values are the same bits on a CPU. The divisors are
    tensors because CUDA divides by a Python number as a multiply by its reciprocal (a last-bit difference)."""
    device = pixels.device
    if device not in _NORMALISATION:  # made once per device: a copy to a GPU would wait for it
        mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device)
                     for v in (IMAGENET_MEAN, IMAGENET_STD))
        _NORMALISATION[device] = mean, std, torch.full((), 255.0, device=device)
    mean, std, top = _NORMALISATION[device]
    x = torch.empty((len(pixels), 3, *pixels.shape[2:]), dtype=torch.float32, device=device)
    x.copy_(pixels.expand(-1, 3, -1, -1))  # grey made three channels, in a new tensor: the rest is done in place
    if pixels.dtype == torch.uint8:
        x.div_(top)
    return x.sub_(mean).div_(std)


_NORMALISATION = {}  # device -> (mean, std, 255) as tensors there


def load_image(path, geometry: ResizeCrop) -> torch.Tensor:
    """One preprocessed image (3, h, w) from a file or a PIL image; DataError on a bad file. Pass the geometry
    of the model that will score it: geometry_of(model.config.geometry). Tiled geometries give the whole resized
    frame (the model cuts the tiles: line.frames.predict_frames)."""
    geometry.check(patch_size=1)  # any sizes here; the model checks the multiple of its patch
    if isinstance(path, Image.Image):
        image = _model_mode(path, "the image given", geometry.bit_depth)
    else:
        image = _open(path, geometry.bit_depth)
    return _to_tensor(image, geometry)


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file, from its header."""
    with _reading(path), Image.open(path) as im:
        return im.size


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> dict(image (3,h,w) normalised, mask (1,h,w) in {0,1}, label, path, cls): the model's input
    (the crop, or the whole resized frame). With native=True items also carry native_mask: bool, the mask at
    the original resolution, cut to the crop box (batch them with collate, which keeps lists where sizes
    differ)."""

    def __init__(self, samples, geometry: ResizeCrop, native: bool = False):
        self.samples, self.geometry, self.native = list(samples), geometry.check(patch_size=1), native

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s, g = self.samples[i], self.geometry
        im = _open(s.image, g.bit_depth)
        x = _to_tensor(im, g)
        m = None if s.mask is None else _open_mask(s.mask)
        if m is None:
            mask = torch.zeros(1, *x.shape[-2:])
        elif m.size != im.size:
            raise _size_error(s.mask, m.size, s.image, im.size)
        else:
            if s.mask_threshold is None:  # keep the grey values (a P mask's palette grey)
                m = m.convert("L")
            else:  # class ids or soft values: anomalous where > mask_threshold
                m = Image.fromarray(np.where(np.asarray(m) > s.mask_threshold, 255, 0).astype(np.uint8))
            mask = np.asarray(_resize_and_crop(m, g)) > 127
            mask = torch.from_numpy(mask[None].astype(np.float32))
        item = dict(image=x, mask=mask, label=s.label, path=s.image, cls=s.cls)
        if self.native:
            left, top, right, bottom = crop_box(*im.size, g)
            full = m if m is not None else Image.new("L", im.size)
            item["native_mask"] = torch.from_numpy(np.asarray(full)[top:bottom, left:right] > 127)
        return item

    @property
    def frame_items(self) -> list[int]:
        """Items per image file: one (a tiled set has one per tile)."""
        return [1] * len(self.samples)

    def decoded(self, i) -> np.ndarray:
        """The items of image file i before normalisation, as the training image store keeps them: (1, C, h, w),
        see _pixels."""
        return _pixels(_open(self.samples[i].image, self.geometry.bit_depth), self.geometry)[None]

    @staticmethod
    def collate(items):
        """default_collate, except where sizes can differ: native_mask always, and image and mask when the
        frames keep their own sizes (tiles); those stay lists."""
        native = [item.pop("native_mask") for item in items if "native_mask" in item]
        sizes = {tuple(item["image"].shape) for item in items}
        lists = {}
        if len(sizes) > 1:
            lists = {k: [item.pop(k) for item in items] for k in ("image", "mask")}
        batch = torch.utils.data.default_collate(items)
        batch.update(lists)
        if native:
            batch["native_mask"] = native
        return batch


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
    """[(data set, root, classes)] for data and root that may be comma lists ("mvtec,visa" and "/d/mvtec,/d/visa":
    the paper's super-multi-class setting, one model on several data sets): "all" means all classes of each set,
    and named classes are taken from every set that has them. A class no set knows is a DataError."""
    datas = split_list(data)
    if isinstance(root, (str, list, tuple)):
        roots = split_list(root)
    else:  # a Path, or None
        roots = [root] if root else []
    roots = roots or [default_root(d) for d in datas]
    if len(roots) != len(datas) or None in roots:
        raise error(root or data, f"{len(datas)} data set(s) ({', '.join(datas)}) need as many comma-separated "
                                   "roots (--data-root)")
    known = [list_classes(d, r) for d, r in zip(datas, roots)]
    names = list(dict.fromkeys(split_list(classes)))
    if names and names != ["all"]:
        unknown = [c for c in names if not any(c in k for k in known)]
        if unknown:
            raise error(",".join(map(str, roots)), f"unknown class {', '.join(map(repr, unknown))} for "
                         f"{','.join(datas)} (known: {', '.join(dict.fromkeys(c for k in known for c in k))})")
        known = [[c for c in names if c in k] for k in known]
    return [(d, str(r), cs) for d, r, cs in zip(datas, roots, known) if cs]


def train_set(data, root, classes, geometry: ResizeCrop, shots: int | None = None, seed: int = 1,
              check: bool = True) -> torch.utils.data.Dataset:
    """The training images of `classes` (single-class: one name; unified multi-class: "all") of the data sets
    of resolve_sets(data, root, classes). shots=k draws k images per class with one random.Random(seed) over the
    classes in order (the official setup_seed(1) + random.sample) and expands each into its 22 views (square
    crops only: the views rotate). A tiled geometry gives every tile of every image (line.frames.TileDataset).
    check=True runs check_samples first, so a bad file stops the run before training rather than inside a loader
    worker."""
    if shots and (geometry.crop_size is None or geometry.crop_size[0] != geometry.crop_size[1]):
        raise ValueError("--setting few-shot rotates each shot: it needs a square --crop-size (not none, not HxW)")
    rng, chosen = random.Random(seed), []
    for d, r, clss in resolve_sets(data, root, classes):
        for cls in clss:
            samples = list_samples(d, r, cls, "train")
            if shots:
                if shots > len(samples):
                    raise error(Path(samples[0].image).parent, f"{len(samples)} training images, "
                                                                f"cannot draw {shots} shots")
                samples = rng.sample(samples, shots)
            if check:
                check_samples(samples)
            chosen += samples
    if shots:
        ds = ImageDataset(chosen, geometry)
        return FewShotSet(torch.stack([ds[i]["image"] for i in range(len(ds))]), chosen)
    if geometry.tile:
        from line.frames import TileDataset

        return TileDataset(chosen, geometry)
    return ImageDataset(chosen, geometry)


def test_set(data, root, cls, geometry: ResizeCrop, check: bool = True,
             native: bool = False) -> ImageDataset:
    """All test images of one class with their masks (all-zero for normal images); native: see ImageDataset."""
    samples = list_samples(data, root, cls, "test")
    if check:
        check_samples(samples)
    return ImageDataset(samples, geometry, native)


# ----------------------------------------------------------------------------------------------------------
# The training images decoded once. The recipe has no augmentation, so every epoch sees the same pixels: they are
# decoded, resized and cropped in one pass before training and normalised on the device in each step.

STORE_IN_MEMORY = 4 * 2**30  # bytes: a larger store (or one under torchrun) is a memory-mapped file in the run folder
STORE_VERSION = 1  # of how the store holds pixels (_pixels); a store.json of another version is made again


class ImageStore(torch.utils.data.Dataset):
    """Item k of a training set (ImageDataset, line.frames.TileDataset, or a ConcatDataset of them) as
    _pixels made it: uint8, or float32 in [0, 1] when a wide grey image is among them; 3 channels, or 1 when all
    are grey. A DataLoader with a batch sampler gathers a whole batch at once (__getitems__); data.normalise
    makes it the model's input. folder: where its file is (None: in memory)."""

    def __init__(self, pixels: torch.Tensor, folder: Path | None = None):
        self.pixels, self.folder = pixels, folder

    def __len__(self):
        return len(self.pixels)

    def __getitems__(self, indices):
        return self.pixels.index_select(0, torch.tensor(indices))  # 20x faster than indexing with a list

    @staticmethod
    def collate(batch):
        return batch  # __getitems__ gathered it

    def __reduce__(self):
        if self.folder is None:
            return super().__reduce__()
        # To a loader worker started afresh (spawn, forkserver): the file's name, not a copy of its bytes.
        return _mapped_store, (self.folder, tuple(self.pixels.shape), self.pixels.dtype)


def _mapped_store(folder: Path, shape, dtype) -> ImageStore:
    pixels = torch.from_file(str(folder / "images.bin"), shared=False, size=math.prod(shape), dtype=dtype)
    return ImageStore(pixels.view(shape), folder)


def image_store(dataset, folder: Path, workers=0, log=print, rank=0, world=1, budget=STORE_IN_MEMORY) -> ImageStore:
    """The training images of `dataset` decoded once by `workers` loader processes: in memory when they fit
    `budget` in one process, else in <folder>/images.bin, which every torchrun process maps and fills its share of.
    folder/store.json, written last, records what it was made from (each file's size and modification time, the
    geometry); a store it does not describe is made again, so a resumed run reuses the file or rebuilds it, never
    a stale one. A store in memory is made at every start."""
    parts = dataset.datasets if isinstance(dataset, torch.utils.data.ConcatDataset) else [dataset]
    frames = [(part, i) for part in parts for i in range(len(part.samples))]
    items = [n for part in parts for n in part.frame_items]  # dataset items (tiles) per decoded frame
    samples = [part.samples[i] for part, i in frames]
    channels, dtype = _store_format(samples)
    height, width = parts[0].geometry.input_size()
    shape = (sum(items), channels, height, width)
    size = math.prod(shape) * dtype.itemsize
    recipe = dict(version=STORE_VERSION, shape=list(shape), dtype=str(dtype),
                  geometry=[part.geometry.to_dict() for part in parts],
                  files=[[s.image, *_stat(s.image)] for s in samples])
    in_memory = world == 1 and size <= budget
    file, found = folder / "images.bin", None
    if not in_memory:
        with contextlib.suppress(OSError, ValueError):  # no store yet, or one cut short before store.json
            found = json.loads((folder / "store.json").read_text())
            if file.stat().st_size != size:  # the record outlived its file
                found = None
        if found is not None and found != recipe:
            log(f"image cache: {folder} was made from other files or settings; making it again")
    where = "in memory" if in_memory else f"at {file}"
    if found != recipe:
        t0 = time.time()
        if in_memory:
            pixels = torch.empty(shape, dtype=dtype)
        else:
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                with open(file, "wb") as f:
                    f.truncate(size)
            _barrier(world)
            pixels = torch.from_file(str(file), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        first, last = len(frames) * rank // world, len(frames) * (rank + 1) // world  # this process's share
        at = sum(items[:first])
        decode = _Decode(frames[first:last], channels, dtype)
        # About 16 images travel from the workers at a time (handing each over alone took a quarter longer);
        # a tiled frame is many images, so it travels alone.
        frames_in = torch.utils.data.DataLoader(decode, batch_size=max(1, 16 // max(items)), collate_fn=torch.cat,
                                                num_workers=min(workers, len(decode)))
        for x in frames_in:
            pixels[at:at + len(x)] = x
            at += len(x)
        if not in_memory:
            del pixels  # unmapped: the writes are in the file
            _barrier(world)
            if rank == 0:
                with inpformer.atomic_write(folder / "store.json") as tmp:
                    Path(tmp).write_text(json.dumps(recipe))
            _barrier(world)
        log(f"image cache: {shape[0]} images, {size / 2**30:.2f} GiB, {where} (decoded in {time.time() - t0:.0f}s)")
    else:
        log(f"image cache: {shape[0]} images, {size / 2**30:.2f} GiB, {where} (reused)")
    if in_memory:
        return ImageStore(pixels)
    return _mapped_store(folder, shape, dtype)


class _Decode(torch.utils.data.Dataset):
    """Frame k of a store's share, decoded as the store keeps it: (items, channels, h, w)."""

    def __init__(self, frames, channels, dtype):
        self.frames, self.channels, self.dtype = frames, channels, dtype

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, k):
        part, i = self.frames[k]
        x = part.decoded(i)
        if self.dtype == torch.float32 and x.dtype == np.uint8:  # 8-bit images beside wide grey ones
            x = x.astype(np.float32) / np.float32(255)
        if x.shape[1] != self.channels:  # grey beside colour images
            x = np.repeat(x, self.channels, axis=1)
        return torch.from_numpy(np.array(x, order="C"))  # contiguous, and writable as torch wants


def _store_format(samples) -> tuple[int, torch.dtype]:
    """(channels, dtype) of a store of these images, from their files' headers."""
    modes = set()
    for s in samples:
        with _reading(s.image), Image.open(s.image) as im:
            modes.add(im.mode)
    dtype = torch.float32 if modes & set(WIDE_GREY) else torch.uint8
    channels = 1 if modes <= {"L", *WIDE_GREY} else 3
    return channels, dtype


def _stat(path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()

# ----------------------------------------------------------------------------------------------------------
# `python data.py --check DATA ROOT`


def check_data_set(data: str, root, classes="all", log=print) -> None:
    """Count every class's images and check every file (see check_samples); a DataError names the first bad one."""
    start, files = time.perf_counter(), 0
    for cls in resolve_classes(data, root, classes):
        train, test = list_samples(data, root, cls, "train"), list_samples(data, root, cls, "test")
        check_samples(train + test)
        files += len(train) + len(test) + sum(s.mask is not None for s in test)
        defects = collections.Counter(s.defect for s in test if s.label)
        n_bad = defects.total()
        by_defect = ", ".join(f"{d} {n}" for d, n in sorted(defects.items()))
        log(f"{cls}: train {len(train)}, test {len(test) - n_bad} good + {n_bad} defective ({by_defect})")
    log(f"checked {files} files in {time.perf_counter() - start:.1f} s")


def main(argv=None) -> int:
    import train  # the command line every script shares

    p = train.Parser(description="Check a data set: class counts, and every image and mask opens and is complete.")
    p.add_argument("--check", nargs=2, metavar=("DATA", "ROOT"), required=True,
                   help=f"count the classes of DATA ({', '.join(DATASETS)}) under ROOT and check every file")
    p.add_argument("--classes", default="all", help="'all' or a comma list")
    args = p.parse_args(argv)
    check_data_set(*args.check, args.classes)
    return 0


if __name__ == "__main__":
    import train

    train.guard(main)
