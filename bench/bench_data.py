"""Images/s of the training loader as train.py builds it (its batch sampler, workers and normalisation): the store
that decodes each image once (data.image_store), against decoding every image again every epoch, in one run.

    python bench/bench_data.py                                     # generated 1024x1024 PNGs, MVTec layout
    python bench/bench_data.py --data folder --root ../shared/fixtures/texture_ad   # 256x256 grey PNGs
    python bench/bench_data.py --data mvtec --root /data/mvtec_anomaly_detection --classes bottle,carpet --workers 2

"decode-every-epoch" is one epoch of the DataLoader over data.ImageDataset (decode, resize, crop, normalise in
the workers), after an untimed one that warms the page cache. "first epoch" runs from a cold start (workers not
started, no store) to the last batch, the store's decoding pass included; "later epochs" are epochs 2 and on, as
many as take at least --seconds. Both paths end with normalised float32 batches. The generated set (make_demo at
1024x1024: 2 classes x 32 train images) is cached in the temp folder, so only the first run pays for writing it.
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


def epoch(loader, batches, n, normalise=False):
    """One epoch of `loader` (its sampler `batches` at epoch n), each batch made the model's input."""
    batches.epoch = n
    for batch in loader:
        x = data.normalise(batch) if normalise else batch["image"]
        assert x.dtype == torch.float32


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="folder", choices=data.DATASETS)
    p.add_argument("--root", help="data root (default: a generated 1024x1024 MVTec-layout set)")
    p.add_argument("--classes", default="all")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--crop-size", type=int, default=392)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=4, help="loader processes (train.py's default: 4, at most the CPUs)")
    p.add_argument("--passes", type=int, default=1, help="timed decode-every-epoch epochs")
    p.add_argument("--seconds", type=float, default=5.0, help="the least time the later epochs are timed for")
    args = p.parse_args()

    root = args.root
    if root is None:
        root = demo.make_demo(Path(tempfile.gettempdir()) / "inpformer-bench-1024", seed=0, n_train=32,
                              n_test_good=12, n_test_defect=20, size=1024)
    try:
        classes = data.resolve_classes(args.data, root, args.classes)
        geometry = ResizeCrop(args.image_size, args.crop_size)
        training = data.train_set(args.data, root, classes, geometry)
    except data.DataError as e:
        print(f"error: {train.one_line(e)}", file=sys.stderr)
        return 2
    with Image.open(training.samples[0].image) as im:
        kind = f"{im.size[0]}x{im.size[1]} {im.mode} {im.format}"
    print(f"data: {args.data} {root} ({', '.join(classes)}): {len(training)} training images, {kind}")
    print(f"loader: resize {args.image_size}, crop {args.crop_size}, batch {args.batch_size}, workers {args.workers}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than CPUs, if asked
    batches = train.EpochBatches(len(training), args.batch_size, seed=1)
    images = len(batches) * args.batch_size

    every = train.training_loader(training, batches, args.workers, torch.device("cpu"))
    epoch(every, batches, 0)  # warm-up: page cache, worker start-up
    start = time.perf_counter()
    for n in range(args.passes):
        epoch(every, batches, 1 + n)
    decode_every_epoch = args.passes * images / (time.perf_counter() - start)
    del every

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        store = data.image_store(training, Path(folder) / "image_cache", args.workers, log=print)
        once = train.training_loader(store, batches, args.workers, torch.device("cpu"))
        epoch(once, batches, 0, normalise=True)
        first = images / (time.perf_counter() - start)
        start, n = time.perf_counter(), 1
        while n == 1 or time.perf_counter() - start < args.seconds:
            epoch(once, batches, n, normalise=True)
            n += 1
        later = (n - 1) * images / (time.perf_counter() - start)
    print(f"loader: first epoch {first:.1f} img/s, later epochs {later:.1f} img/s, decode-every-epoch "
          f"{decode_every_epoch:.1f} img/s (workers {args.workers}, batch {args.batch_size}, {args.crop_size} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
