"""Whole runs against the model: does evaluate.py (and predict.py --images) keep the model's own bf16 gain?

    python bench/bench_runs.py                 # 60 test images, a base-size model at the paper's 448 -> 392
    python bench/bench_runs.py --images 120 --rounds 2

It takes about 7 minutes per round on a 2-core CPU; run it with nothing else busy on the machine. It writes, in
a temporary folder that it leaves for inspection (its path is the last line printed), an official-format
checkpoint (a ViT-B/14-with-registers INP-Former with seeded random weights saved as a plain state dict
`model.pth`, the form the authors publish, about 600 MB) and one MVTec-layout class of --images test images
(512 x 512 RGB photos of smooth noise; half carry a bright ellipse and its mask). Then it measures:
- the model's own gain: `predict` on --batch-size images, fp32, and bf16 with the model cast once (as the runs
  cast it), the best of 3 interleaved rounds; speed does not depend on the weights or the pixels;
- the whole runs, each a fresh process started as a user starts it, so that imports, loading the checkpoint,
  decoding and resizing the images, the metrics or the decisions, and the files written all count:
  `evaluate.py --precision fp32|bf16` and `predict.py --images DIR --precision fp32|bf16`, wall-clock, the
  best of --rounds rounds (fp32 first in odd rounds, bf16 first in even ones).
It prints each run's seconds and images/s, its bf16/fp32 ratio, and that ratio over the model's own: the share
of the model's gain the whole run keeps (1.00: all of it).
"""
import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import inpformer  # noqa: E402
import line.cpu  # noqa: E402
import line.frames  # noqa: E402


def write_class(folder: Path, n: int, size=512, seed=0):
    """An MVTec-layout class `part`: n test images, the odd ones with a bright ellipse and its mask; one train
    image (the layout asks for train/good; the runs do not read it)."""
    rng = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (folder / "part" / sub).mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n + 1):
        coarse = rng.random((size // 32, size // 32, 3))
        photo = np.kron(coarse, np.ones((32, 32, 1))) * 0.6 + rng.random((size, size, 3)) * 0.2
        if i == n:
            Image.fromarray((photo * 255).astype(np.uint8)).save(folder / "part/train/good/000.png")
        elif i % 2 == 0:
            Image.fromarray((photo * 255).astype(np.uint8)).save(folder / f"part/test/good/{i:03d}.png")
        else:
            cy, cx, ry, rx = rng.integers(100, 412), rng.integers(100, 412), rng.integers(10, 60), rng.integers(10, 60)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            photo[mask] = 0.95
            Image.fromarray((photo * 255).astype(np.uint8)).save(folder / f"part/test/spot/{i:03d}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"part/ground_truth/spot/{i:03d}_mask.png")


def write_checkpoint(work: Path):
    """A ViT-B/14-with-registers INP-Former with seeded random weights as work/model.pth, the authors' format
    (names only, no metadata); returns the model."""
    torch.manual_seed(0)
    model = inpformer.INPFormer(inpformer.vit_base()).eval()
    torch.save(model.state_dict(), work / "model.pth")
    return model


def bench_parser(doc, images, batch_size, rounds, rounds_help) -> argparse.ArgumentParser:
    """The flags of the benches that run the scripts on a written class: --images, --batch-size, --rounds; the
    description is the first paragraph of `doc`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--images", type=int, default=images, help=f"test images (default {images})")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"the runs' batch size, and the model's own (default {batch_size})")
    p.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default {rounds})")
    return p


def workspace(prefix, images):
    """A new folder holding a written class of `images` test images (data/) and a checkpoint (model.pth); returns
    (the folder, the checkpoint's model)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    write_class(work / "data", images)
    return work, write_checkpoint(work)


def whole_runs(work: Path, batch_size) -> dict:
    """{name: argv} of the runs as a user starts them, on work/model.pth and work/data (write_class)."""
    common = ["--ckpt", str(work / "model.pth"), "--batch-size", str(batch_size)]
    return {
        "evaluate.py": ["evaluate.py", *common, "--data", "mvtec", "--data-root", str(work / "data"),
                        "--classes", "part"],
        "predict.py --images": ["predict.py", *common, "--images", str(work / "data/part/test")],
    }


def model_gain(model, batch, rounds=3):
    """{precision: images/s} of the model's maps and scores on a batch at the paper's 392 x 392 as the runs compute
    them (line.frames.predict_frames, line/cpu.py's attention in bf16), the best of interleaved rounds."""
    x = torch.randn(batch, 3, 392, 392)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    line.cpu.use_cpu_attention(cast.encoder)
    paths = {"fp32": lambda: line.frames.predict_frames(model, x),
             "bf16": lambda: line.frames.predict_frames(cast, x.to(torch.bfloat16))}
    best = {}
    for name, fn in paths.items():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    return {name: batch / seconds for name, seconds in best.items()}


def main():
    a = bench_parser(__doc__, images=60, batch_size=16, rounds=1,
                     rounds_help="interleaved rounds of the four runs").parse_args()
    work, model = workspace("bench_runs_", a.images)
    own = model_gain(model, a.batch_size)
    del model
    runs = whole_runs(work, a.batch_size)
    seconds = {}
    for r in range(a.rounds):
        for name, argv in runs.items():
            for precision in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
                out = work / f"out-{name.split('.')[0]}-{precision}-{r}"
                t = time.perf_counter()
                subprocess.run([sys.executable, *argv, "--precision", precision, "--out", str(out)], cwd=ROOT,
                               check=True, stdout=subprocess.DEVNULL)
                key = (name, precision)
                seconds[key] = min(seconds.get(key, float("inf")), time.perf_counter() - t)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; ViT-B/14 with "
          f"registers, 448 -> 392, batch {a.batch_size}, {a.images} images; the best of {a.rounds} round(s)")
    print(f"the model's own: predict fp32 {own['fp32']:.3f} images/s, bf16 {own['bf16']:.3f} images/s, "
          f"bf16/fp32 x{own['bf16'] / own['fp32']:.2f}")
    print("| run | fp32 s | bf16 s | fp32 images/s | bf16 images/s | bf16/fp32 | of the model's own ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in runs:
        fp32, bf16 = seconds[(name, "fp32")], seconds[(name, "bf16")]
        kept = (fp32 / bf16) / (own["bf16"] / own["fp32"])
        print(f"| {name} | {fp32:.1f} | {bf16:.1f} | {a.images / fp32:.3f} | {a.images / bf16:.3f} | "
              f"x{fp32 / bf16:.2f} | {kept:.2f} |")
    print(f"(files in {work})")


if __name__ == "__main__":
    main()
