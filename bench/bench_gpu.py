"""train.py's step on a GPU in each speed setting, ready for a lent machine: ViT-B/14-reg4 at 392x392, batch 16.

    python bench/bench_gpu.py                 # on the GPU; one Markdown table in under 8 minutes
    python bench/bench_gpu.py --dry-run       # the same code on the CPU at a tiny size (a few minutes: compiling)

Each row is one train.py setting run by train.py's own pieces: train.setup on a synthetic set of 512x512 PNGs
(its image store or feature cache), its loader, and the loop's step (step_inputs, add_loss, optimizer_step),
--iters steps after a warm-up (longer with --compile). Columns: images/s; the share of the step's time the host
spent waiting for the next batch (the step never waits for the device, so a fed GPU shows ~0 %); peak GPU memory;
and the projected wall time of the MVTec AD multi-class recipe (200 epochs of 3,629 images at batch 16: 45,200
steps; saves, the store's one decoding pass and the evaluation not counted). Settings: fp32 (the official
numerics), fp32 --tf32, fp32 --cache-features, bf16, bf16 --cache-features, and those two with --compile. A few
steps of the first row run under torch.cuda.set_sync_debug_mode("warn"), which warns at each call that waits for
the device: the line under the table counts them. Random weights and images: speed does not depend on them.
"""
import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import inpformer  # noqa: E402
import train  # noqa: E402

RECIPE_ITERS = 45_200  # MVTec AD multi-class: 3,629 training images, batch 16, 200 epochs
SETTINGS = {
    "fp32": [],
    "fp32 --tf32": ["--tf32"],
    "fp32 --cache-features": ["--cache-features"],
    "bf16": ["--precision", "bf16"],
    "bf16 --cache-features": ["--precision", "bf16", "--cache-features"],
    "bf16 --compile": ["--precision", "bf16", "--compile"],
    "bf16 --cache-features --compile": ["--precision", "bf16", "--cache-features", "--compile"],
}


def write_images(root, n, side):
    """n random side x side PNGs as the training images of one class of a "folder" data set (and one test image,
    which train.py's checks want to find)."""
    rng = np.random.default_rng(0)
    for i in range(n + 1):
        path = Path(root) / "synthetic" / ("train" if i < n else "test") / "good" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path, compress_level=1)


def measure(argv, encoder, device, warmup, iters, sync_check=0):
    """(images/s, share of the time waiting for data, peak GPU MiB, host-sync warnings) of `iters` steps of the
    training run train.py would make of argv, after `warmup` steps; the first sync_check timed steps run under
    the CUDA sync debug mode."""
    args = train.parse_args(argv)
    [plan] = train.plan(args, lambda m: None)
    plan.out.mkdir(parents=True)
    run = train.setup(args, encoder, plan.sets, plan.out, device, lambda m: None)
    loader = train.training_loader(train.training_data(run), run.batches, run.workers, device)
    epoch, stream = 0, iter(())
    run.model.train()
    cuda = device.type == "cuda"
    waited, warned = 0.0, []
    for step in range(warmup + iters):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            waited, start = 0.0, time.perf_counter()
        if cuda and sync_check and step in (warmup, warmup + sync_check):
            torch.cuda.set_sync_debug_mode("warn" if step == warmup else 0)
        t = time.perf_counter()
        batch = next(stream, None)
        if batch is None:  # the next epoch
            run.batches.epoch, epoch = epoch, epoch + 1
            stream = iter(loader)
            batch = next(stream)
        waited += time.perf_counter() - t
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with run.amp:
                loss = run.net(**train.step_inputs(run, batch))
            train.add_loss(run, loss, step)
            train.optimizer_step(loss, run.opt, run.scaler, run.model.trainable_parameters())
        warned += [w for w in caught if "synchroniz" in str(w.message)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    train.check_window(run, warmup + iters, plan.out / "model.safetensors")  # the log line's check: finite
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return iters * run.batches.batch_size / seconds, waited / seconds, peak, len(warned)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny ViT, 112 px, batch 4, 2 steps: checks the code")
    p.add_argument("--iters", type=int, default=30, help="timed steps per setting (default 30)")
    a = p.parse_args()
    dry = a.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    size, batch, iters, workers = (112, 4, 2, 2) if dry else (392, 16, a.iters, train.workers(None, 8))
    torch.manual_seed(0)
    encoder = inpformer.ViT(inpformer.ViTConfig(embed_dim=64, depth=10, num_heads=1)) if dry else inpformer.vit_base()
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, ViT {encoder.config.embed_dim} wide, {size}x{size}, batch {batch}, "
          f"{workers} loader workers\n")
    print("| setting | images/s | waiting for data | peak GPU memory (MiB) | projected recipe |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp) / "data", 8 * batch, 512)
        warnings_seen = None
        for n, (setting, flags) in enumerate(SETTINGS.items()):
            if device.type != "cuda" and "--tf32" in flags:
                print(f"| {setting} | CUDA only | | | |")
                continue
            argv = ["--data", "folder", "--data-root", str(Path(tmp) / "data"), "--image-size", str(size * 8 // 7),
                    "--crop-size", str(size), "--batch-size", str(batch), "--workers", str(workers), "--device",
                    str(device), "--out", str(Path(tmp) / f"run{n}"), "--no-eval", *flags]
            warmup = 2 if dry else (15 if "--compile" in flags else 5)
            with train.tf32("--tf32" in flags):  # as train.py: for this setting only
                rate, waiting, peak, warned = measure(argv, encoder, device, warmup, iters, sync_check=0 if n else 5)
            if n == 0:
                warnings_seen = warned
            hours = RECIPE_ITERS * batch / rate / 3600
            print(f"| {setting} | {rate:.1f} | {100 * waiting:.0f} % | {peak:.0f} | {hours:.2f} h |", flush=True)
    if device.type == "cuda":
        print(f"\nhost syncs in 5 steps of fp32 under torch.cuda.set_sync_debug_mode('warn'): {warnings_seen}")


if __name__ == "__main__":
    main()
