"""Time the seven exact metrics of metrics.py on an MVTec-AD-sized workload, on the CPU.

    python bench/bench_metrics.py              # 1725 images of 256x256 (the MVTec AD test set's size)
    python bench/bench_metrics.py --images 200 # a smaller workload
    python bench/bench_metrics.py --float16    # also time float16 maps (what an AMP evaluation may store)

The workload is synthetic and seeded: smooth float32 anomaly maps (two scales of interpolated noise, false-
positive bumps on some images) and blob masks on about 2/3 of the images (ellipses, ragged blobs and thin
scratches of very different sizes), whose blurred silhouette is added to the map with a random strength, so
some defects are weak. It times compute_all (all seven metrics, exact), aupro alone, and the streaming
PixelHistogram (batches of 32), and prints the seconds and the peak memory of each: the growth of the
process's resident set (VmHWM, reset before each call) and the peak of numpy allocations (tracemalloc, in a
second, untimed call), next to the bytes of the maps.
"""
import argparse
import math
import os
import sys
import time
import tracemalloc

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import metrics  # noqa: E402


def make_workload(n_images=1725, size=256, seed=0, chunk=64):
    """(image labels, image scores, masks, maps): bool (N,), float32 (N,), bool and float32 (N, H, W)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.empty(n_images, size, size)
    masks = torch.zeros(n_images, size, size, dtype=torch.bool)
    axis = torch.arange(size, dtype=torch.float32)

    def rand(lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    def smooth(b, grid, mode):
        return F.interpolate(torch.rand(b, 1, grid, grid, generator=g), size=(size, size), mode=mode,
                             align_corners=False)[:, 0]

    def blur(x, k=9):  # two separable box blurs, close enough to a Gaussian; the window has a margin
        x = x[:, None]
        for _ in range(2):
            x = F.avg_pool2d(x, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False)
            x = F.avg_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)
        return x[:, 0]

    def window(cy, cx, r):  # the part of the image within r of (cy, cx), and its coordinates
        y0, y1 = max(0, int(cy - r)), min(size, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r)), min(size, int(cx + r) + 2)
        return (slice(y0, y1), slice(x0, x1)), axis[y0:y1, None] - cy, axis[None, x0:x1] - cx

    for s in range(0, n_images, chunk):
        b = min(chunk, n_images - s)
        m = 0.10 + 0.08 * smooth(b, 6, "bicubic") + 0.04 * smooth(b, 24, "bilinear")
        ragged = smooth(b, 16, "bilinear")
        mask = masks[s:s + b]
        for i in range(b):
            if rand() < 1 / 3:  # a false-positive bump
                r = rand(4, 20)
                w, dy, dx = window(rand(0, size), rand(0, size), 4 * r)
                m[i][w] += rand(0.05, 0.3) * torch.exp(-(dy ** 2 + dx ** 2) / (2 * r ** 2))
            if rand() >= 2 / 3:
                continue
            for _ in range(int(rand(1, 4))):  # 1 to 3 defects: ellipses, ragged blobs, thin scratches
                major = math.exp(rand(math.log(3), math.log(60)))
                minor = max(1.2, major * rand(0.05, 1.0))
                angle = rand(0, math.pi)
                cos, sin = math.cos(angle), math.sin(angle)
                w, dy, dx = window(rand(10, size - 10), rand(10, size - 10), 1.25 * major + 10)
                u, v = (dx * cos + dy * sin) / major, (dy * cos - dx * sin) / minor
                jag = 1 + (ragged[i][w] - 0.5) if rand() < 0.5 else 1.0
                blob = u * u + v * v <= jag
                mask[i][w] |= blob
                m[i][w] += rand(0.02, 0.6) * blur(blob[None].float())[0]  # some are barely visible
        maps[s:s + b] = m
    maps, masks = maps.numpy(), masks.numpy()
    return masks.any(axis=(1, 2)), maps.max(axis=(1, 2)), masks, maps


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def measure(fn):
    """(result, (wall s, CPU s), resident-set growth in bytes or None, tracemalloc peak in bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        rss0 = _status_kib("VmRSS")
    except OSError:
        rss0 = None
    t, cpu = time.perf_counter(), time.process_time()
    out = fn()
    seconds = time.perf_counter() - t, time.process_time() - cpu
    grown = None if rss0 is None else (_status_kib("VmHWM") - rss0) * 1024
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, grown, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1725)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="batch size of the streaming mode")
    ap.add_argument("--float16", action="store_true", help="also time compute_all on float16 maps")
    args = ap.parse_args()

    t = time.perf_counter()
    labels, scores, masks, maps = make_workload(args.images, args.size)
    mb = maps.nbytes / 2 ** 20
    print(f"workload: {args.images} images {args.size}x{args.size}, {labels.sum()} with defects, "
          f"{masks.mean():.2%} anomalous pixels, maps {maps.dtype} {mb:.0f} MiB "
          f"(built in {time.perf_counter() - t:.1f} s; torch threads {torch.get_num_threads()})")

    def report(what, seconds, grown, peak, ref=maps.nbytes):
        g = "n/a" if grown is None else f"{grown / 2 ** 20:.0f} MiB ({grown / ref:.2f}x maps)"
        print(f"{what:<38} {seconds[0]:6.2f} s (CPU {seconds[1]:5.2f} s)   peak RSS growth {g}, "
              f"numpy peak {peak / 2 ** 20:.0f} MiB ({peak / ref:.2f}x maps)")

    exact, *m = measure(lambda: metrics.compute_all(labels, scores, masks, maps))
    report("compute_all (7 exact metrics)", *m)
    _, *m = measure(lambda: metrics.aupro(masks, maps))
    report("aupro (exact, limit 0.3)", *m)

    def streaming():
        hist = metrics.PixelHistogram()
        for s in range(0, len(maps), args.batch):
            hist.update(masks[s:s + args.batch], maps[s:s + args.batch])
        return hist

    hist, *m = measure(streaming)
    report(f"PixelHistogram update (batch {args.batch})", *m)
    streamed, *m = measure(hist.compute)
    report("PixelHistogram compute", *m)
    bounds = hist.error_bounds()
    if args.float16:
        maps16 = maps.astype(np.float16)
        exact16, *m = measure(lambda: metrics.compute_all(labels, maps16.max(axis=(1, 2)), masks, maps16))
        report("compute_all, float16 maps", *m, ref=maps16.nbytes)

    print(f"\nstreaming: {hist.bins} bins over [{hist.lo}, {hist.hi}], resolution {hist.resolution:.3g}")
    print(f"{'metric':<9} {'exact':>12} {'streaming':>12} {'|difference|':>13} {'bound':>10}")
    for k, v in exact.items():
        if k in streamed:
            print(f"{k:<9} {v:12.8f} {streamed[k]:12.8f} {abs(v - streamed[k]):13.2e} {bounds[k]:10.2e}")
        else:
            print(f"{k:<9} {v:12.8f}")


if __name__ == "__main__":
    main()
