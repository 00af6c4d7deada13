"""CPU scoring of two checkouts side by side: bench/bench_runs.py's whole runs (evaluate.py and predict.py --images
on an authors'-format ViT-B/14-reg checkpoint and 512 px photos of noise, 448 -> 392) in fp32, alternating the
two trees round by round, so that a refactoring can show it is no slower.

    git worktree add /tmp/before <commit>
    python bench/before_after.py --before /tmp/before --images 16 --batch-size 8 --rounds 2

Each run is a fresh process started as a user starts it. It prints every run's seconds, then the best of the
rounds per tree and their ratio. Run it with nothing else busy on the machine.
"""
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_runs import bench_parser, whole_runs, workspace  # noqa: E402


def main():
    p = bench_parser(__doc__, images=16, batch_size=8, rounds=2, rounds_help="rounds; the trees' order alternates")
    p.add_argument("--before", required=True, help="the other checkout (e.g. a git worktree of an older commit)")
    p.add_argument("--after", default=str(ROOT), help="this checkout (default: the one this script is in)")
    a = p.parse_args()
    work = workspace("before_after_", a.images)[0]  # the model itself is not needed here
    trees = {"before": a.before, "after": a.after}
    runs = {name: [*argv, "--precision", "fp32"] for name, argv in whole_runs(work, a.batch_size).items()}
    best = {}
    for r in range(a.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for name, argv in runs.items():
            for tree in order:
                out = work / f"out-{tree}-{name.split('.')[0]}-{r}"
                t = time.perf_counter()
                subprocess.run([sys.executable, *argv, "--out", str(out)], cwd=trees[tree], check=True,
                               stdout=subprocess.DEVNULL)
                seconds = time.perf_counter() - t
                best[(name, tree)] = min(best.get((name, tree), float("inf")), seconds)
                print(f"round {r} {name} {tree}: {seconds:.1f} s", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ViT-B/14 with registers, 448 -> 392, "
          f"batch {a.batch_size}, {a.images} images, fp32, the best of {a.rounds} round(s)")
    print("| run | before s | after s | after/before |\n|---|---:|---:|---:|")
    for name in runs:
        before, after = best[(name, "before")], best[(name, "after")]
        print(f"| {name} | {before:.1f} | {after:.1f} | {after / before:.3f} |")
    print(f"(files in {work})")


if __name__ == "__main__":
    main()
