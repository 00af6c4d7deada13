"""How far `python train.py --data demo` moves with the CPU kernels and the seed (issue #11's acceptance).

    python bench/demo_spread.py                      # ATEN_CPU_CAPABILITY unset and avx2, seeds 0 1 2
    python bench/demo_spread.py --seeds 0 1 --kernels default

Runs the demo once per (kernel, seed), one run at a time (two torch processes on 2 cores run 10-30x slower),
into a temporary folder, and prints every run's table, the spread of each cell, and each cell's largest
distance from the README's table. Each run takes 30-45 s on a 2-core CPU.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (\w+) \|" + r" ([0-9.]+) \|" * 7 + "$", re.M)
NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")


def table(text):
    return {m[0]: [float(v) for v in m[1:]] for m in ROW.findall(text)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kernels", nargs="+", default=["default", "avx2"],
                   help='"default" leaves ATEN_CPU_CAPABILITY unset')
    args = p.parse_args()
    readme = (ROOT / "README.md").read_text().split("## The main job, with nothing downloaded", 1)[1]
    want, runs = table(readme.split("\n## ", 1)[0]), {}
    with tempfile.TemporaryDirectory() as tmp:
        for kernel in args.kernels:
            for seed in args.seeds:
                env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
                if kernel != "default":
                    env["ATEN_CPU_CAPABILITY"] = kernel
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "demo", "--seed", str(seed),
                                    "--data-root", f"{tmp}/demo", "--out", f"{tmp}/{kernel}-{seed}"],
                                   capture_output=True, text=True, env=env)
                if r.returncode:
                    sys.exit(f"{kernel} seed {seed} failed:\n{r.stderr}")
                runs[f"{kernel} seed {seed}"] = table(r.stdout)
                print(f"{kernel} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("| class | run | " + " | ".join(NAMES) + " |\n|---|---|" + "---:|" * len(NAMES))
    for cls in want:
        for name, t in [("README", want[cls]), *((k, v[cls]) for k, v in runs.items())]:
            print(f"| {cls} | {name} | " + " | ".join(f"{x:.1f}" for x in t) + " |")
        cells = list(zip(*(v[cls] for v in runs.values())))
        print(f"| {cls} | spread | " + " | ".join(f"{max(c) - min(c):.1f}" for c in cells) + " |")
        print(f"| {cls} | off README | " + " | ".join(f"{max(abs(x - w) for x in c):.1f}"
                                                     for c, w in zip(cells, want[cls])) + " |")


if __name__ == "__main__":
    main()
