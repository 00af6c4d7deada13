"""One GPU benchmark, ready to run on a lent machine in well under 8 minutes: ViT-B/14-reg4 at 392x392.

    python bench/bench_gpu.py                 # on the GPU; prints one Markdown table
    python bench/bench_gpu.py --dry-run       # the same code on the CPU at a tiny size, in seconds

Rows: bf16 (and fp32) prediction images/s; training iterations/s at batch 16 in bf16 autocast, with the
frozen encoder in every step and with cached encoder features, each as the model step alone (one batch on
the device, repeated) and with data loading as train.py has it (PNG files through data.ImageDataset and a
DataLoader); peak GPU memory of each; the cost of the per-iteration loss.item() (a GPU sync) against a
loop without it; and the projected wall time of the multi-class MVTec AD recipe (45,200 iterations at batch
16). Synthetic inputs and random weights only: speed does not depend on them, and nothing of ../shared is read.
Needs only torch, numpy, pillow and safetensors (Python 3.10+, torch 2.4+).
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cli  # noqa: E402
import data  # noqa: E402
import inpformer  # noqa: E402
import train  # noqa: E402

RECIPE_ITERS = 45_200


def timed(fn, iters, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: kernels, allocator, optimizer state
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - t) / iters, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny ViT, 112 px, 2 iterations: checks the code")
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args()
    dry = a.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    size, batch, iters = (112, 4, 2) if dry else (392, 16, a.iters)
    torch.manual_seed(0)
    vit = inpformer.ViT(inpformer.ViTConfig(embed_dim=64, depth=10, num_heads=1)) if dry else inpformer.vit_base()
    model = inpformer.INPFormer(vit).to(device)
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, ViT {vit.config.embed_dim} wide, {size}x{size}\n")
    print("| what | batch | per iteration | images/s | peak GPU memory (MiB) |\n|---|---:|---:|---:|---:|")
    row = lambda what, b, dt, peak: print(f"| {what} | {b} | {dt * 1e3:.1f} ms | {b / dt:.1f} | {peak:.0f} |", flush=True)

    for precision in ("bf16", "fp32"):  # prediction as evaluate.py runs it: the model cast to the dtype
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        m = copy.deepcopy(model).to(device, dtype).eval()
        x = torch.randn(2 * batch, 3, size, size, device=device, dtype=dtype)
        dt, peak = timed(lambda: m.predict(x), iters, device)
        row(f"predict {precision}", 2 * batch, dt, peak)
        del m
    model.train()
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    params = model.trainable_parameters()
    opt, scaler = train.StableAdamW(params), torch.amp.GradScaler(device.type, enabled=False)
    x = torch.randn(batch, 3, size, size, device=device)
    net = train.LossModule(model, train.step_encoder(model, device, torch.bfloat16))
    with amp:
        en, fused = model.encode(x, net.encoder)
    grid = model.token_grid(x)

    def step(features=None, images=None, sync=True):
        with amp:
            loss = net(features=(en, fused, grid)) if features else net(images)
        if sync:
            loss.item()  # what train.py does every iteration (the non-finite check and the log)
        train.optimizer_step(loss, opt, scaler, params)

    times = {}
    for what, fn in [("train step, encoder in the step", lambda: step(images=x)),
                     ("train step, encoder in the step, no loss.item()", lambda: step(images=x, sync=False)),
                     ("train step, cached features", lambda: step(features=(en, fused))),
                     ("train step, cached features, no loss.item()", lambda: step(features=(en, fused), sync=False))]:
        dt, peak = timed(fn, iters, device)
        times[what] = dt
        row(what, batch, dt, peak)

    with tempfile.TemporaryDirectory() as tmp:  # PNGs through the real input pipeline, 448 -> 392
        rng = np.random.default_rng(0)
        samples = []
        for i in range(4 * batch):
            path = os.path.join(tmp, f"{i:03d}.png")
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path, compress_level=1)
            samples.append(data.Sample(path, None, 0, "synthetic", "good"))
        ds = data.ImageDataset(samples, inpformer.Geometry(size * 8 // 7, size))
        workers = cli.workers(None, 8)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                             pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        stream = iter(())

        def loaded_step():
            nonlocal stream
            b = next(stream, None)
            if b is None:
                stream = iter(loader)
                b = next(stream)
            step(images=b["image"].to(device, non_blocking=True))

        dt, peak = timed(loaded_step, iters, device)
        times["with data loading"] = dt
        row(f"train step with data loading ({workers} workers)", batch, dt, peak)
    print(f"\nprojected wall time of the multi-class recipe ({RECIPE_ITERS} iterations at batch {batch}):")
    for what in ("train step, encoder in the step", "train step, cached features", "with data loading"):
        print(f"  {what}: {RECIPE_ITERS * times[what] / 3600:.2f} h")
    sync_cost = times["train step, encoder in the step"] - times["train step, encoder in the step, no loss.item()"]
    print(f"loss.item() per iteration costs {sync_cost * 1e3:+.1f} ms with the encoder in the step, "
          f"{(times['train step, cached features'] - times['train step, cached features, no loss.item()']) * 1e3:+.1f}"
          " ms with cached features")


if __name__ == "__main__":
    main()
