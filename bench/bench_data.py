"""Images/s of the MVTec-style loading pipeline (decode, resize 448, centre crop 392, normalise) in a DataLoader.

Reads every train image (image only) and every test image (image and mask) of the chosen classes, with 0, 2
and 4 workers; each setting gets an untimed warm-up pass, so file caching and worker start-up do not count.

    python bench/bench_data.py                                     # generated 1024x1024 PNGs, MVTec layout
    python bench/bench_data.py --data folder --root ../shared/fixtures/texture_ad   # 256x256 grey PNGs
    python bench/bench_data.py --data mvtec --root /data/mvtec_anomaly_detection --classes bottle,carpet

The generated set (make_demo at 1024x1024: 2 classes x 32 train + 32 test images) is cached in the temp
folder, so only the first run pays the ~20 s it takes to write.
"""
import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402
from data import ResizeCrop  # noqa: E402


def images_per_second(dataset, workers: int, batch_size: int, passes: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         persistent_workers=workers > 0)
    for _ in loader:                      # warm-up: page cache, worker start-up
        pass
    start = time.perf_counter()
    for _ in range(passes):
        for _ in loader:
            pass
    return passes * len(dataset) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="folder", choices=data.DATASETS)
    p.add_argument("--root", help="data root (default: a generated 1024x1024 MVTec-layout set)")
    p.add_argument("--classes", default="all")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--crop-size", type=int, default=392)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", default="0,2,4")
    p.add_argument("--passes", type=int, default=2, help="timed passes per setting")
    args = p.parse_args()

    root = args.root
    if root is None:
        root = demo.make_demo(Path(tempfile.gettempdir()) / "inpformer-bench-1024", seed=0, n_train=32,
                              n_test_good=12, n_test_defect=20, size=1024)
    try:
        classes = data.resolve_classes(args.data, root, args.classes)
        geometry = ResizeCrop(args.image_size, args.crop_size)
        training = data.train_set(args.data, root, classes, geometry)
        test = torch.utils.data.ConcatDataset([data.test_set(args.data, root, c, geometry) for c in classes])
    except data.DataError as e:
        print(f"error: {train.one_line(e)}", file=sys.stderr)
        return 2
    with Image.open(test.datasets[0].samples[0].image) as im:
        kind = f"{im.size[0]}x{im.size[1]} {im.mode} {im.format}"
    print(f"data: {args.data} {root} ({', '.join(classes)}): {len(training)} train, {len(test)} test images, {kind}")
    print(f"pipeline: resize {args.image_size}, crop {args.crop_size}, batch {args.batch_size}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    # More workers than CPUs is the point of the 4-worker row on small machines; the warning would repeat.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    for workers in (int(w) for w in args.workers.split(",")):
        tr = images_per_second(train, workers, args.batch_size, args.passes)
        te = images_per_second(test, workers, args.batch_size, args.passes)
        print(f"workers {workers}: train {tr:7.1f} images/s (image)   test {te:7.1f} images/s (image + mask)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
