"""The operations one StableAdamW step asks of torch: top-level aten operations counted with torch.profiler on the
CPU, for this checkout's optimizer and (--before DIR) another checkout's, on a base-size INP-Former's trainable
parameters with random gradients.

    python bench/optimizer_ops.py --before /tmp/before

Top-level: an aten operation called by the optimizer itself, not one that another aten operation runs inside it
(a _foreach_ operation counts once however many tensors it updates). Also prints each step's milliseconds.
"""
import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import inpformer  # noqa: E402
import train  # noqa: E402
from bench_model import checkout_train  # noqa: E402


def top_level_ops(optimizer_class, params):
    """({aten operation: calls} of one step, seconds of a step) after two warm-up steps."""
    opt = optimizer_class(params)
    for _ in range(2):  # the moments are made at the first step
        opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    counts = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            counts[event.name] += 1
    start = time.perf_counter()
    for _ in range(5):
        opt.step()
    return counts, (time.perf_counter() - start) / 5


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", metavar="DIR", help="another checkout (e.g. a git worktree of an older commit)")
    a = p.parse_args()
    torch.manual_seed(0)
    model = inpformer.INPFormer(inpformer.vit_base())
    params = model.trainable_parameters()
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    print(f"{len(params)} trainable tensors, {sum(q.numel() for q in params) / 1e6:.1f} M values, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    optimizers = {"this checkout": train.StableAdamW}
    if a.before:
        optimizers["before"] = checkout_train(a.before).StableAdamW
    for name, optimizer_class in optimizers.items():
        copies = [q.detach().clone().requires_grad_() for q in params]
        for copy, param in zip(copies, params):
            copy.grad = param.grad.clone()
        counts, seconds = top_level_ops(optimizer_class, copies)
        print(f"{name}: {sum(counts.values())} top-level aten operations a step, {seconds * 1e3:.0f} ms a step "
              f"({', '.join(f'{op} {n}' for op, n in counts.most_common(6))}, ...)")


if __name__ == "__main__":
    main()
