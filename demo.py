"""The built-in demo: a small procedural data set in MVTec layout, and the small random ViT that trains on it,
so that `python train.py --data demo` runs end to end with nothing downloaded.

    python demo.py DIR              # write the demo set to DIR (train.py --data demo writes demo_data/ itself)
    python demo.py DIR --seed 1     # another draw of the same set

Two classes, tiles and a woven fabric, with scratches, translucent spots and chipped pieces that bare a
differently coloured layer, and exact masks. Files depend only on the settings (each image has its own
seeded generator), so every machine writes the same set.
"""
import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import inpformer
from data import DataError

SIZE = 256  # the demo images' side
# train.py's defaults for --data demo: a small set and a small ViT train in well under a minute on a CPU.
RECIPE = dict(geometry=data.ResizeCrop(SIZE, 224), batch_size=8, epochs=6, workers=2)

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
              n_test_defect: int = 18, size: int = SIZE) -> Path:
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
        raise DataError(f"{out}: exists and is not a demo data set; not overwriting it")

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for ci, cls in enumerate(classes):
        if cls in _DEMO_COLOURS:
            recipe, colour = cls, np.float32(_DEMO_COLOURS[cls])
        else:  # other class names reuse the two recipes, in a colour of their own
            recipe = tuple(_DEMO_COLOURS)[ci % 2]
            colour = np.float32(np.random.default_rng([seed, ci]).uniform(0.25, 0.8, 3))

        for split, folder, n in ((0, "train", n_train), (1, "test", n_test_good)):
            for i in range(n):
                rng = np.random.default_rng([seed, ci, split, i])  # one generator per image
                _save(tmp / cls / folder / "good" / f"{i:03d}.png", _texture(recipe, rng, size, colour))
        for i in range(n_test_defect):
            kind, n = DEMO_DEFECTS[i % len(DEMO_DEFECTS)], i // len(DEMO_DEFECTS)
            rng = np.random.default_rng([seed, ci, 2, i])
            image, mask = _defect(kind, rng, _texture(recipe, rng, size, colour))
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


def backbone():
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


def main(argv=None) -> int:
    import train  # the command line every script shares (it imports this file)

    p = train.script_parser(__doc__)
    p.add_argument("out", metavar="DIR", help="folder to write the demo set to (kept if it already holds it)")
    p.add_argument("--seed", type=int, default=0, help="demo set seed (default 0)")
    args = p.parse_args(argv)
    print(f"demo data set in {make_demo(args.out, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    import train

    train.guard(main)
