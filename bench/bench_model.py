"""Speed against the machine's own limits: a base-size INP-Former (ViT-B/14 with registers) at 392 x 392.

    python bench/bench_model.py                                   # this project, CPU fp32 and bf16
    python bench/bench_model.py --official /path/to/INP-Former    # ... beside the official code, same weights
    python bench/bench_model.py --mode train --official DIR       # training steps (bench_train.py says the same)

In one process and one run, it measures:
- the machine's matrix-product rates, fp32 and bf16, at the model's own shapes: the four products of an encoder
  block (qkv, proj, fc1, fc2) at the rows the model multiplies at once, ten blocks of weights, as a forward runs them;
- the model's FLOPs per image, counted (torch.utils.flop_counter over one forward, or one training step:
  forward, backward and the optimizer's products), not estimated;
- each path's images/s, and the matrix-product rates: the best of --reps interleaved rounds (every path and the
  products once a round, so that a slow spell of a shared machine touches them alike, and the best round, since
  noise only ever slows one down); the fraction of the roofline (images/s x FLOPs per image / the matrix-product
  rate of the path's dtype), and the ratio to the official code.
Paths: the forward (en and de maps; no_grad) of this project and of the official code in fp32; this project's
predict (forward, maps and scores) in fp32 and in bf16 (the model cast once, as evaluation runs it). Train mode:
one training step as each training script runs it, fp32, and this project's in bf16 autocast. Weights are the
official code's random ones loaded into both where --official is given (speed does not depend on them).
"""
import argparse
import copy
import importlib.util
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import inpformer  # noqa: E402
import line.cpu  # noqa: E402
import line.frames  # noqa: E402
import train  # noqa: E402


def matmul_probes(rows, width, hidden, blocks=10):
    """{"fp32": fn, "bf16": fn}: the four products of `blocks` encoder blocks (the ten up to the last target
    layer), each block with weights of its own, at `rows` rows, as the model runs them (F.linear with a bias,
    (out, in) weights: qkv, proj, fc1, fc2); and the FLOPs of one call. Distinct weights, since a weight read
    again straight away would come from the cache, as the model's never does."""
    shapes = [(width, 3 * width), (width, width), (width, hidden), (hidden, width)]
    probes = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        inputs = {k: torch.randn(rows, k, dtype=dtype) for k, _ in shapes}
        weights = [[(torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)) for k, n in shapes]
                   for _ in range(blocks)]

        def run(_, inputs=inputs, weights=weights):
            for block in weights:
                for w, b in block:
                    F.linear(inputs[w.shape[1]], w, b)
        probes[name] = run
    return probes, blocks * sum(2 * rows * k * n for k, n in shapes)


def cpu_attention_flops(name, args):
    """FLOPs of the CPU's fused attention, which torch's registry leaves out (it lists the CUDA kernels), by
    the registry's own formulas for the others: the forward's two products, the backward's five (the scores
    recomputed, then the gradients of the scores, values, queries and keys). 0 for any other operation."""
    if name == "aten._scaled_dot_product_flash_attention_for_cpu":
        query, key, value = args[:3]
        return sdpa_flop_count(query.shape, key.shape, value.shape)
    if name == "aten._scaled_dot_product_flash_attention_for_cpu_backward":
        grad_out, query, key, value = args[:4]
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)
    return 0


class FlopCount(TorchDispatchMode):
    """The FLOPs of every operation run inside it, by torch's own formulas (torch.utils.flop_counter's
    registry: matrix products, convolutions, attention, forward and backward), without its module tracking;
    and the CPU's fused attention, which the registry does not know (cpu_attention_flops)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        else:
            self.flops += cpu_attention_flops(str(func._overloadpacket), args)
        return out


def count_flops(fn, x):
    """FLOPs of one call fn(x)."""
    with FlopCount() as counter:
        fn(x)
    return counter.flops


def ours_train_step(model, precision, module=train):
    """A step as `module` (train.py, or another checkout's: --before) runs it."""
    params = model.trainable_parameters()
    opt = module.StableAdamW(params)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    amp_dtype = None if precision == "fp32" else module.PRECISIONS[precision]
    amp = torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None)
    loss = module.LossModule(model, module.step_encoder(model, torch.device("cpu"), amp_dtype))
    window = SimpleNamespace(loss_sum=torch.zeros((), dtype=torch.float64), loss_count=0,
                             first_bad=torch.full((), torch.inf, dtype=torch.float64))

    def step(x):
        with amp:
            value = loss(x)
        if hasattr(module, "add_loss"):
            module.add_loss(window, value, 0)  # the loss stays on the device until a log line
        else:
            value.item()  # the loop before that read it in every step
        module.optimizer_step(value, opt, scaler, params)
    return step


def checkout_train(folder):
    """train.py of another checkout, as a module of its own (on this checkout's model code)."""
    spec = importlib.util.spec_from_file_location("train_before", Path(folder) / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paths(mode, official_dir, before=None):
    """{name: (callable(x), its dtype, the callable whose FLOPs are counted)} of the paths to time, every model on
    the same weights. A model's FLOPs are counted once, in fp32: its bf16 path does the same arithmetic."""
    torch.manual_seed(0)
    ours = inpformer.INPFormer(inpformer.vit_base()).eval()
    found = {}
    if official_dir:
        import official

        theirs = official.build(official_dir).eval()
        ours.load_state_dict(theirs.state_dict())  # the official names: the same weights in both
        if mode == "forward":
            forward = torch.no_grad()(theirs)
            found["official forward fp32"] = (forward, "fp32", forward)
        else:
            step = official.train_step_fn(official_dir, theirs.train())
            found["official train step fp32"] = (step, "fp32", step)
    if mode == "forward":
        forward = torch.no_grad()(ours)
        found["ours forward fp32"] = (forward, "fp32", forward)
        # predict as evaluate.py and predict.py run it: line/cpu.py's passes, and its attention in bf16
        predict = torch.no_grad()(lambda x: line.frames.predict_frames(ours, x))
        found["ours predict fp32"] = (predict, "fp32", predict)
        cast = copy.deepcopy(ours).to(torch.bfloat16)
        line.cpu.use_cpu_attention(cast.encoder)
        found["ours predict bf16"] = (lambda x: line.frames.predict_frames(cast, x.to(torch.bfloat16)), "bf16",
                                      predict)
    else:
        steps = {}
        for precision in ("fp32", "bf16"):
            steps[precision] = ours_train_step(copy.deepcopy(ours).train(), precision)
        found["ours train step fp32"] = (steps["fp32"], "fp32", steps["fp32"])
        # FLOPs are counted in fp32 (the bf16 step does the same arithmetic), on a fp32 step of a third copy of
        # the weights: the bf16 path has no fp32 step of its own, and counting runs a step
        spare = copy.deepcopy(ours).train()
        found["ours train step bf16"] = (steps["bf16"], "bf16", ours_train_step(spare, "fp32"))
        if before:
            step = ours_train_step(copy.deepcopy(ours).train(), "fp32", checkout_train(before))
            found["before train step fp32"] = (step, "fp32", step)
    return found


def main(mode="forward", doc=__doc__):
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--official", help="a checkout of luow23/INP-Former to compare against")
    p.add_argument("--mode", choices=["forward", "train"], default=mode)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=392)
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions of every path (default 7)")
    p.add_argument("--before", metavar="DIR", help="train mode: also the fp32 step of another checkout's train.py "
                                                  "(e.g. a git worktree of an older commit)")
    a = p.parse_args()
    x = torch.randn(a.batch, 3, a.size, a.size)
    found = paths(a.mode, a.official, a.before)
    tokens = (a.size // 14) ** 2 + 5  # patches, class token, 4 registers
    # The rows the model multiplies at once: a training step's whole batch; in inference on a CPU, the images
    # of one pass (line.cpu.CPU_PASS_BYTES), as predict runs them (the plain forward takes the batch at once).
    with torch.device("meta"):
        base = inpformer.INPFormer(inpformer.vit_base())
    images = a.batch if a.mode == "train" else line.cpu.images_per_pass(base, x)
    probes, probe_flops = matmul_probes(images * tokens, 768, 3072)
    flops = {}
    for name, (fn, _, counted) in found.items():
        fn(x)  # warm-up: allocator, kernels, the optimizer's state
        flops[name] = count_flops(counted, x) / a.batch
    timed = {**{f"matrix products {k}": v for k, v in probes.items()}, **{k: v[0] for k, v in found.items()}}
    times = {name: [] for name in timed}
    for _ in range(a.reps):  # every path once a round: a slow spell of a shared machine touches all alike
        for name, fn in timed.items():
            t = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t)
    # Each path's best round: noise only ever slows a round down, so the best is the machine's own speed.
    rates = {k: probe_flops / min(times[f"matrix products {k}"]) for k in probes}
    speed = {name: a.batch / min(times[name]) for name in found}
    spread = {name: statistics.median(t) / min(t) - 1 for name, t in times.items()}
    print(f"{a.mode}: torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, {a.size} px; "
          f"matrix products at the model's shapes ({images * tokens} rows): fp32 {rates['fp32'] / 1e9:.1f} "
          f"GFLOP/s, bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s (bf16/fp32 x{rates['bf16'] / rates['fp32']:.2f}); "
          f"the best of {a.reps} interleaved rounds", flush=True)
    reference = next((speed[n] for n in speed if n.startswith("official")), None)
    print("| path | GFLOP/image | images/s | of the roofline | x official | median round slower by |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (_, dtype, _) in found.items():
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
