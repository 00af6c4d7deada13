"""Speed against the machine's own limits: a base-size INP-Former (ViT-B/14 with registers) at 392 x 392.

    python bench/bench_model.py                                   # this project, CPU fp32 and bf16
    python bench/bench_model.py --official /path/to/INP-Former    # ... beside the official code, same weights
    python bench/bench_model.py --mode train --official DIR       # training steps (bench_train.py says the same)

In one process and one run, it measures:
- the machine's matrix-product rates, fp32 and bf16, at the model's own shapes: the four products of an encoder
  block (qkv, proj, fc1, fc2) at (batch x tokens) rows, timed as a block runs them;
- the model's FLOPs per image, counted (torch.utils.flop_counter over one forward, or one training step:
  forward, backward and the optimizer's products), not estimated;
- each path's images/s: the median of --reps interleaved repetitions (every path once per round, so that a
  slow spell of a shared machine touches every path alike), its fraction of the roofline (images/s x FLOPs per
  image / the matrix-product rate of its dtype), and its ratio to the official code.
Paths: the forward (en and de maps; no_grad) of this project and of the official code in fp32; this project's
predict (forward, maps and scores) in fp32 and in bf16 (the model cast once, as evaluation runs it). Train mode:
one training step as each training script runs it, fp32, and this project's in bf16 autocast. Weights are the
official code's random ones loaded into both where --official is given (speed does not depend on them).
"""
import argparse
import os
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import inpformer  # noqa: E402
import train  # noqa: E402


def matmul_rates(rows, width, hidden, reps=5):
    """{dtype: FLOP/s} of one encoder block's four products at `rows` rows: qkv, proj, fc1, fc2."""
    shapes = [(width, 3 * width), (width, width), (width, hidden), (hidden, width)]
    flops = sum(2 * rows * k * n for k, n in shapes)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        inputs = [torch.randn(rows, k, dtype=dtype) for k, _ in shapes]
        weights = [torch.randn(k, n, dtype=dtype) for k, n in shapes]
        for a, w in zip(inputs, weights):  # warm-up
            a @ w
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for a, w in zip(inputs, weights):
                a @ w
            times.append(time.perf_counter() - t)
        rates[name] = flops / statistics.median(times)
    return rates


def count_flops(fn, x):
    """FLOPs of one call fn(x), counted by torch's flop counter (matrix products, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def ours_train_step(model, precision):
    params = model.trainable_parameters()
    opt = train.StableAdamW(params)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    amp_dtype = None if precision == "fp32" else inpformer.PRECISIONS[precision]
    amp = torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None)
    loss = train.LossModule(model, train.step_encoder(model, torch.device("cpu"), amp_dtype))

    def step(x):
        with amp:
            value = loss(x)
        value.item()  # as train.py: the non-finite check
        train.optimizer_step(value, opt, scaler, params)
    return step


def paths(mode, official_dir):
    """{name: (callable(x), its dtype)} of the paths to time, every model on the same weights."""
    torch.manual_seed(0)
    ours = inpformer.INPFormer(inpformer.vit_base()).eval()
    found = {}
    if official_dir:
        import official

        theirs = official.build(official_dir).eval()
        ours.load_state_dict(theirs.state_dict())  # the official names: the same weights in both
        if mode == "forward":
            found["official forward fp32"] = (torch.no_grad()(theirs), "fp32")
        else:
            found["official train step fp32"] = (official.train_step_fn(official_dir, theirs.train()), "fp32")
    if mode == "forward":
        found["ours forward fp32"] = (torch.no_grad()(ours), "fp32")
        found["ours predict fp32"] = (ours.predict, "fp32")
        cast = inpformer.INPFormer(inpformer.vit_base())
        cast.load_state_dict(ours.state_dict())
        cast = cast.to(torch.bfloat16).eval()
        found["ours predict bf16"] = (lambda x: cast.predict(x.to(torch.bfloat16)), "bf16")
    else:
        for precision in ("fp32", "bf16"):
            model = inpformer.INPFormer(inpformer.vit_base())
            model.load_state_dict(ours.state_dict())
            found[f"ours train step {precision}"] = (ours_train_step(model.train(), precision), precision)
    return found


def main(mode="forward", doc=__doc__):
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--official", help="a checkout of luow23/INP-Former to compare against")
    p.add_argument("--mode", choices=["forward", "train"], default=mode)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=392)
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions of every path (default 7)")
    a = p.parse_args()
    x = torch.randn(a.batch, 3, a.size, a.size)
    found = paths(a.mode, a.official)
    tokens = (a.size // 14) ** 2 + 5  # patches, class token, 4 registers
    rates = matmul_rates(a.batch * tokens, 768, 3072)
    print(f"{a.mode}: torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, {a.size} px; "
          f"matrix products at the model's shapes: fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
          f"{rates['bf16'] / 1e9:.1f} GFLOP/s (bf16/fp32 x{rates['bf16'] / rates['fp32']:.2f})", flush=True)
    flops = {}
    for name, (fn, _) in found.items():
        fn(x)  # warm-up: allocator, kernels, the optimizer's state
        flops[name] = count_flops(fn, x) / a.batch
    times = {name: [] for name in found}
    for _ in range(a.reps):
        for name, (fn, _) in found.items():
            t = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t)
    speed = {name: a.batch / statistics.median(t) for name, t in times.items()}
    spread = {name: (max(t) - min(t)) / statistics.median(t) for name, t in times.items()}
    reference = next((speed[n] for n in speed if n.startswith("official")), None)
    print("| path | GFLOP/image | images/s | of the roofline | x official | spread of the reps |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (_, dtype) in found.items():
        roofline = rates[dtype] / flops[name]
        ratio = f"x{speed[name] / reference:.2f}" if reference else "-"
        print(f"| {name} | {flops[name] / 1e9:.1f} | {speed[name]:.3f} | {100 * speed[name] / roofline:.0f} % | "
              f"{ratio} | {100 * spread[name]:.0f} % |")
    fp32 = next(n for n in speed if n.startswith("ours") and n.endswith("fp32") and "forward" not in n)
    bf16 = next(n for n in speed if n.startswith("ours") and n.endswith("bf16"))
    target = rates["bf16"] / rates["fp32"]
    print(f"\nbf16 / fp32 ({bf16} / {fp32}): x{speed[bf16] / speed[fp32]:.2f}, against the matrix products' "
          f"x{target:.2f}: {speed[bf16] / speed[fp32] / target:.2f} of it")
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
