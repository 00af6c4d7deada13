"""Forward throughput and peak memory of a base-size INP-Former (ViT-B/14 with registers) at 392x392.

    python bench/bench_model.py                                   # this project: CPU fp32 and bf16 (+ CUDA)
    python bench/bench_model.py --official ~/src/INP-Former       # ... and the official code on the same machine
    python bench/bench_model.py --batch 8 --iters 5 --size 392

Each measurement runs in a fresh process so that its peak memory (CPU: peak resident set size of the
process, torch and Python included; CUDA: torch.cuda.max_memory_allocated) is its own. Weights are random:
speed does not depend on them. The forward is the evaluation forward: no_grad, en/de maps for every image.
CPU bf16 runs as the project runs it: evaluation casts the whole model to bf16 once (maps and scores stay
fp32), training uses bf16 autocast with the frozen encoder cast once (train.step_encoder).
"""
import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]


def build(impl, official):
    if impl == "ours":
        import inpformer

        return inpformer.INPFormer(inpformer.vit_base())
    import official as off

    return off.build(official)


def train_step(impl, model, official, precision):
    """One full training iteration as each implementation's training script runs it."""
    if impl == "official":
        import official as off

        return off.train_step_fn(official, model)
    import inpformer
    import train

    params = model.trainable_parameters()
    opt = train.StableAdamW(params)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    amp_dtype = None if precision == "fp32" else inpformer.PRECISIONS[precision]
    loss = train.LossModule(model, train.step_encoder(model, next(model.parameters()).device, amp_dtype))
    return lambda x: train.optimizer_step(loss(x), opt, scaler, params)


def measure(mode, impl, device, precision, batch, iters, size, official):
    torch.manual_seed(0)
    device = torch.device(device)
    model = build(impl, official).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    if mode != "train" and impl == "ours" and dtype is not None:  # as evaluate.py: the model cast once
        model, x, ctx = model.to(dtype), x.to(dtype), contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if mode == "train":
        model.train()
        step = train_step(impl, model, official, precision)
    else:
        model.eval()
        step = torch.no_grad()(model)
    with ctx:
        step(x)  # warm-up: allocator, kernels, optimizer state
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(iters):
            step(x)
        sync()
        dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(mode=mode, impl=impl, device=device.type, precision=precision, batch=batch, size=size,
                images_per_s=batch * iters / dt, peak_mib=peak / 2**20)


def main(mode="forward", doc=__doc__):
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--official", help="a checkout of luow23/INP-Former to compare against")
    p.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    p.add_argument("--iters", type=int, default=None, help="timed forwards (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--size", type=int, default=392)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        impl, device, precision = a.worker.split(",")
        print(json.dumps(measure(mode, impl, device, precision, a.batch, a.iters, a.size, a.official)))
        return
    configs = [("cpu", "fp32"), ("cpu", "bf16")]
    if torch.cuda.is_available():
        configs += [("cuda", "bf16"), ("cuda", "fp32")]
    impls = ["ours"] + (["official"] if a.official else [])
    print(f"{mode}: torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    print("| impl | device | precision | batch | images/s | peak memory (MiB) |")
    print("|---|---|---|---:|---:|---:|")
    rows = []
    for device, precision in configs:
        for impl in impls if (device, precision) != ("cpu", "bf16") else ["ours"]:
            batch = a.batch or (4 if device == "cpu" else 32)
            iters = a.iters or (3 if device == "cpu" else 20)
            cmd = [sys.executable, sys.argv[0], "--worker", f"{impl},{device},{precision}", "--batch", str(batch),
                   "--iters", str(iters), "--size", str(a.size)] + (["--official", a.official] if a.official else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"| {impl} | {device} | {precision} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"| {impl} | {device} | {precision} | {batch} | {r['images_per_s']:.2f} | {r['peak_mib']:.0f} |",
                  flush=True)
    for device, precision in configs:
        mine = [r for r in rows if r["impl"] == "ours" and (r["device"], r["precision"]) == (device, precision)]
        theirs = [r for r in rows if r["impl"] == "official" and (r["device"], r["precision"]) == (device, precision)]
        if mine and theirs:
            print(f"speed-up {device} {precision}: {mine[0]['images_per_s'] / theirs[0]['images_per_s']:.2f}x")
    ours = {(r["device"], r["precision"]): r["images_per_s"] for r in rows if r["impl"] == "ours"}
    if ("cpu", "bf16") in ours and ("cpu", "fp32") in ours:
        print(f"ours cpu bf16 / fp32: {ours['cpu', 'bf16'] / ours['cpu', 'fp32']:.2f}x")


if __name__ == "__main__":
    main()
