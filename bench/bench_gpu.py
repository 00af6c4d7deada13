"""One GPU benchmark, ready to run on a lent machine in well under 8 minutes: ViT-B/14-reg4 at 392x392.

    python bench/bench_gpu.py                 # on the GPU; prints one Markdown table and the projections
    python bench/bench_gpu.py --dry-run       # the same code on the CPU at a tiny size, in seconds

Rows: prediction images/s in fp32 (the default) and bf16; training iterations/s at batch 16 in fp32 (the
official recipe and train.py's default) and in bf16 autocast (opt-in), with the frozen encoder in every step
and with cached encoder features, each as the model step alone (one batch on the device, repeated); one fp32
step with data loading as train.py has it (PNG files through data.ImageDataset and a DataLoader); peak GPU
memory of each; and one save as train.py writes it (train_state.pt, then model.safetensors): bytes and
seconds. Then the projected wall time of the multi-class MVTec AD recipe (45,200 iterations at batch 16, 200
epochs) with its saves: once every epoch (as main did before --save-every) and every 600 s (the default).
Synthetic inputs and random weights only: speed does not depend on them, and nothing of ../shared is read.
Needs only torch, numpy, pillow and safetensors (Python 3.10+, torch 2.4+).
"""
import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import inpformer  # noqa: E402
import train  # noqa: E402

RECIPE_ITERS, RECIPE_EPOCHS = 45_200, 200  # MVTec AD multi-class: 3,629 training images, batch 16
SAVE_EVERY = 600.0                         # train.py's default --save-every


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


def row(what, batch, seconds, peak):
    print(f"| {what} | {batch} | {seconds * 1e3:.1f} ms | {batch / seconds:.1f} | {peak:.0f} |", flush=True)


def train_steps(model, x, device, precision, iters):
    """Seconds per training step of `model` on the batch x, encoder in the step and on cached features."""
    amp_dtype = None if precision == "fp32" else train.PRECISIONS[precision]
    amp = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    params = model.trainable_parameters()
    opt, scaler = train.StableAdamW(params), torch.amp.GradScaler(device.type, enabled=False)
    net = train.LossModule(model, train.step_encoder(model, device, amp_dtype))
    with amp:
        en, fused = model.encode(x, net.encoder)
    grid = model.token_grid(x)

    def step(cached):
        with amp:
            loss = net(features=(en, fused, grid)) if cached else net(x)
        loss.item()  # what train.py does every iteration (the non-finite check and the log)
        train.optimizer_step(loss, opt, scaler, params)

    times = {}
    for cached in (False, True):
        what = f"train step {precision}, " + ("cached features" if cached else "encoder in the step")
        times[what], peak = timed(lambda: step(cached), iters, device)
        row(what, len(x), times[what], peak)
    return times, opt


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

    for precision in ("fp32", "bf16"):  # prediction as evaluate.py and predict.py run it: the model cast once
        m = copy.deepcopy(model).to(device, train.PRECISIONS[precision]).eval()
        x = torch.randn(2 * batch, 3, size, size, device=device, dtype=train.PRECISIONS[precision])
        dt, peak = timed(lambda: m.predict(x), iters, device)
        row(f"predict {precision}", 2 * batch, dt, peak)
        del m
    model.train()
    x = torch.randn(batch, 3, size, size, device=device)
    times, opt = train_steps(model, x, device, "fp32", iters)
    times.update(train_steps(copy.deepcopy(model), x, device, "bf16", iters)[0])

    with tempfile.TemporaryDirectory() as tmp:  # PNGs through the real input pipeline, 448 -> 392
        rng = np.random.default_rng(0)
        samples = []
        for i in range(4 * batch):
            path = os.path.join(tmp, f"{i:03d}.png")
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path, compress_level=1)
            samples.append(data.Sample(path, None, 0, "synthetic", "good"))
        ds = data.ImageDataset(samples, data.ResizeCrop(size * 8 // 7, size))
        workers = train.workers(None, 8)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                             pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        params = model.trainable_parameters()
        scaler, net = torch.amp.GradScaler(device.type, enabled=False), train.LossModule(model, model.encoder)
        stream = iter(())

        def loaded_step():
            nonlocal stream
            b = next(stream, None)
            if b is None:
                stream = iter(loader)
                b = next(stream)
            loss = net(b["image"].to(device, non_blocking=True))
            loss.item()
            train.optimizer_step(loss, opt, scaler, params)

        what = f"train step fp32 with data loading ({workers} workers)"
        times["with data loading"], peak = timed(loaded_step, iters, device)
        row(what, batch, times["with data loading"], peak)

        # One save as train.save writes it (the optimizer holds its moments after the steps above).
        run = SimpleNamespace(model=model, opt=opt, scaler=scaler, loss_sum=0.0, loss_count=0, identity={},
                              total=RECIPE_ITERS,
                              out=Path(tmp), meta={})
        t = time.perf_counter()
        train.save(run, 1)
        save_s = time.perf_counter() - t
        sizes = {f: (Path(tmp) / f).stat().st_size for f in ("train_state.pt", "model.safetensors")}
    per_save = sum(sizes.values())
    print(f"\none save: train_state.pt {sizes['train_state.pt'] / 2**20:.0f} MiB + model.safetensors "
          f"{sizes['model.safetensors'] / 2**20:.0f} MiB = {per_save / 2**30:.2f} GiB in {save_s:.2f} s")
    print(f"\nprojected wall time of the multi-class recipe ({RECIPE_ITERS} iterations at batch {batch}, "
          f"{RECIPE_EPOCHS} epochs), with saves every epoch (before) and every {SAVE_EVERY:.0f} s (now):")
    print("| step | compute | + saves every epoch | + saves every 600 s | written every epoch | written every 600 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for what in ("train step fp32, encoder in the step", "train step fp32, cached features", "with data loading",
                 "train step bf16, encoder in the step", "train step bf16, cached features"):
        compute = RECIPE_ITERS * times[what]
        saves_now = int(compute // SAVE_EVERY) + 1
        print(f"| {what} | {compute / 3600:.2f} h | {(compute + RECIPE_EPOCHS * save_s) / 3600:.2f} h | "
              f"{(compute + saves_now * save_s) / 3600:.2f} h | {RECIPE_EPOCHS * per_save / 2**30:.0f} GiB | "
              f"{saves_now * per_save / 2**30:.0f} GiB |")


if __name__ == "__main__":
    main()
