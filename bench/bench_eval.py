"""Images/s and peak memory of evaluate.py's accumulate-and-score path, on MVTec-AD-sized synthetic maps.

    python bench/bench_eval.py                 # 1725 maps of 256x256 (MVTec AD's test set) as one class
    python bench/bench_eval.py --classes 15    # the same images split into 15 classes, as MVTec AD is
    python bench/bench_eval.py --images 5000   # one Real-IAD-sized class

Timed is what evaluate() does with the model's output: per batch of 16, ClassScores.add (maps and bool masks
into the class's buffers, or into metrics.PixelHistogram with --streaming), and per class ClassScores.compute
(all seven metrics). The maps are made batch by batch, as the model hands them over, and making them is not
timed: smooth noise, plus on 2/3 of the images 1-3 soft-edged ellipses whose exact silhouettes are the masks.

Three modes, each in a child process of its own (one torch thread): exact with float32 maps (evaluate.py's
default), exact with float16 maps (--map-dtype float16) and --streaming. Peak memory is the growth of the
child's resident set from just before the first batch to its peak (VmHWM in /proc/self/status, reset first;
where there is no /proc, resource.getrusage's ru_maxrss, which then includes the imports). tracemalloc is not
used: it does not see torch's allocations. The metrics of each mode are printed as differences from exact float32.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402

MODES = {"exact float32": [], "exact float16": ["--map-dtype", "float16"], "streaming": ["--streaming"]}


def batches(n, batch, size, seed):
    """(labels, scores, masks, maps) batches of a seeded synthetic class; scores are the top-1% means."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    for s in range(0, n, batch):
        b = min(batch, n - s)
        noise = torch.rand(b, 1, 8, 8, generator=g)
        maps = 0.1 + 0.1 * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
        masks = torch.zeros(b, size, size, dtype=torch.bool)
        defective = torch.rand(b, generator=g) < 2 / 3
        for k in range(3):
            on = (defective & (torch.rand(b, generator=g) < 1 / (k + 1))).view(b, 1, 1)
            cy, cx = (10 + (size - 20) * torch.rand(2, b, 1, 1, generator=g))
            ry, rx = (2 + 30 * torch.rand(2, b, 1, 1, generator=g))
            r = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2).sqrt()
            soft = on * (1.5 - r).clamp(0, 1)  # a blurred edge without a convolution
            maps += (0.05 + 0.5 * torch.rand(b, 1, 1, generator=g)) * soft
            masks |= on & (r <= 1)
        scores = maps.flatten(1).topk(int(size * size * 0.01), dim=1).values.mean(dim=1)
        yield masks.flatten(1).any(1), scores, masks, maps


def _kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def child(args):
    """One mode: time add + compute over the classes, print a JSON line."""
    # The timed path is memory copies and numpy, which is single-threaded; one torch thread keeps the copies
    # from stalling in OpenMP's spinning threads when other jobs share the CPUs.
    torch.set_num_threads(1)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base, source = _kib("VmRSS"), "VmHWM"
    except OSError:
        base, source = 0, "ru_maxrss (includes imports)"
    per_class = [args.images // args.classes + (c < args.images % args.classes) for c in range(args.classes)]
    timed, results = 0.0, {}
    for c, n in enumerate(per_class):
        acc = evaluate.ClassScores(n, streaming=args.streaming, map_dtype=getattr(torch, args.map_dtype))
        for labels, scores, masks, maps in batches(n, args.batch, args.size, seed=c):
            t = time.perf_counter()
            acc.add(labels, scores, masks, maps)
            timed += time.perf_counter() - t
        t = time.perf_counter()
        results[f"c{c}"] = acc.compute()
        timed += time.perf_counter() - t
    peak = _kib("VmHWM") if source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mean = {k: sum(r[k] for r in results.values()) / len(results) for k in evaluate.METRICS}
    print(json.dumps(dict(seconds=timed, peak_mib=(peak - base) / 1024, source=source, mean=mean)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1725)
    ap.add_argument("--classes", type=int, default=1, help="split the images into this many classes")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)  # child process settings
    ap.add_argument("--map-dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    maps_mib = args.images / args.classes * args.size ** 2 * 4 / 2 ** 20
    print(f"{args.images} synthetic {args.size}x{args.size} maps + masks in {args.classes} class(es), batches of "
          f"{args.batch}; float32 maps of the largest class: {math.ceil(maps_mib)} MiB; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, 1 torch thread")
    common = ["--images", args.images, "--classes", args.classes, "--size", args.size, "--batch", args.batch]
    rows = {}
    for name, extra in MODES.items():
        cmd = [sys.executable, __file__, "--child", *map(str, common), *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n{'mode':<14} {'seconds':>8} {'images/s':>9} {'peak MiB':>9}   max |metric - exact float32| (points)")
    ref = rows["exact float32"]["mean"]
    for name, r in rows.items():
        diff = max(abs(r["mean"][k] - ref[k]) for k in evaluate.METRICS) * 100
        print(f"{name:<14} {r['seconds']:8.2f} {args.images / r['seconds']:9.0f} {r['peak_mib']:9.0f}   {diff:.2e}")
    print(f"\npeak = resident-set growth from the first batch ({rows['exact float32']['source']})")
    print("mean over classes, exact float32: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in ref.items()))


if __name__ == "__main__":
    main()
