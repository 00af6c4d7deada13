"""Decisions a line can act on, measured (issue 25), and the ADEval protocol against the exact metrics (issue 23).

    python bench/line_decisions.py                       # texture_ad and the magnetic tiles of ../shared
    python bench/line_decisions.py --runs /tmp/frames_runs   # reuse bench/frame_modes.py's whole-frame model

For each set, with a real ViT-S/14 (../shared/weights): a model trained as the README's texture_ad row is (224,
10 epochs, cached features), or for the magnetic tiles bench/frame_modes.py's whole-frame model when --runs
has it (else trained the same way). Then:
- the false-reject budget: the test set's good images split in two by position (even, odd), with the defective
  images likewise; predict.calibrate_on with --max-false-reject P on the first half; the false-reject rate on
  the second half's good images and the miss rate on its defects, per P;
- the kNN baseline (evaluate.py --baseline knn) beside INP-Former's table;
- the exact metrics against --metrics adeval (texture_ad): the difference per metric, in points;
- the ONNX export of raw frames (predict.py --export): its size, its largest score difference from eager
  PyTorch and from the Python path, and its speed beside PyTorch's, on the second half's images.
One heavy job: run it alone on the machine.
"""
import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import evaluate  # noqa: E402
import inpformer  # noqa: E402
import line.decisions  # noqa: E402
import line.frames  # noqa: E402
import predict  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "dinov2_vits14_imgfocus" / "model.safetensors"
SETS = {"texture_ad": (SHARED / "fixtures" / "texture_ad", "brick,grass",
                       ["--image-size", "224", "--crop-size", "224"]),
        "magnetic_tile": (SHARED / "fixtures" / "real_ad", "magnetic_tile",
                          ["--image-size", "224", "--crop-size", "none"])}


def train(name, out, runs):
    root, classes, flags = SETS[name]
    if name == "magnetic_tile" and runs and (Path(runs) / "whole" / "model.safetensors").is_file():
        return Path(runs) / "whole" / "model.safetensors"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", "folder", "--data-root", str(root), "--classes", classes,
           "--weights", str(WEIGHTS), *flags, "--batch-size", "8", "--lr", "2e-3", "--cache-features", "--workers",
           "0", "--no-eval", "--out", str(out)]
    cmd += ["--epochs", "10"] if name == "texture_ad" else ["--iters", "300"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "model.safetensors"


def halves(root, classes, geometry):
    """({class: ImageDataset} of the even positions, the same of the odd ones) of every class's test set."""
    first, second = {}, {}
    for c in classes.split(","):
        samples = data.list_samples("folder", root, c, "test")
        first[c] = data.ImageDataset(samples[0::2], geometry)
        second[c] = data.ImageDataset(samples[1::2], geometry)
    return first, second


def budget_rows(model, root, classes, budgets):
    opts = evaluate.Options(batch_size=16, device="cpu")
    first, second = halves(root, classes, data.geometry_of(model.config.geometry))
    held_out = predict.score_calibration_set(model, second, opts, log=lambda m: None)
    rows = []
    for p in budgets:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                rule = predict.calibrate_on(model, first, opts, max_false_reject=p, log=lambda m: None)
            except ValueError as e:
                rows.append((p, str(e)))
                continue
        thresholds = np.array([line.decisions.class_threshold(rule, c) for c in held_out.classes])
        rejected = held_out.scores >= thresholds
        good, bad = ~held_out.labels, held_out.labels
        rows.append((p, dict(threshold=rule["image_threshold"], classes=rule["classes"],
                             calibration_good=sum(s.label == 0 for ds in first.values() for s in ds.samples),
                             false_reject=float(rejected[good].mean()), good=int(good.sum()),
                             miss=float((~rejected[bad]).mean()), bad=int(bad.sum()),
                             calibration_miss=rule.get("miss_rate", {}).get("pooled"))))
    return rows


def export_row(ckpt, root, classes, tmp):
    """The export's size, its difference from eager PyTorch (the same graph) and from the Python path, and speed."""
    import onnxruntime

    model = inpformer.load_model(ckpt)
    cls = classes.split(",")[0]
    files = [s.image for s in data.list_samples("folder", root, cls, "test")][1::2][:40]
    path = Path(tmp) / f"{cls}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        predict.export_onnx(model, path, evaluate.Options(geometry=data.geometry_of(model.config.geometry)), None, cls,
                            log=lambda m: None)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = predict.FrameGraph(model, data.geometry_of(model.config.geometry))
    eager_diff, python_diff, t_onnx, t_eager = 0.0, 0.0, 0.0, 0.0
    for f in files:
        frame = predict.raw_frame(f)[None]
        t0 = time.perf_counter()
        got = float(session.run(None, {"frames": frame})[1][0])
        t1 = time.perf_counter()
        with torch.no_grad():
            eager = float(graph(torch.from_numpy(frame.copy()))[1][0])
        t2 = time.perf_counter()
        x = data.load_image(f, data.geometry_of(model.config.geometry))
        python = float(line.frames.predict_frames(model, x[None])[1][0])
        eager_diff = max(eager_diff, abs(got - eager) / abs(eager))
        python_diff = max(python_diff, abs(got - python) / abs(python))
        t_onnx, t_eager = t_onnx + t1 - t0, t_eager + t2 - t1
    return dict(size_mib=path.stat().st_size / 2**20, eager_diff=eager_diff, python_diff=python_diff,
                onnx_ms=1e3 * t_onnx / len(files), torch_ms=1e3 * t_eager / len(files), images=len(files))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", help="bench/frame_modes.py's --out, to reuse its whole-frame magnetic-tile model")
    p.add_argument("--out", help="keep the trained models here (default: a temporary folder)")
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        for name, (root, classes, _) in SETS.items():
            t0 = time.time()
            ckpt = train(name, out / name, a.runs)
            model = inpformer.load_model(ckpt)
            print(f"\n## {name}: {ckpt} ({data.geometry_of(model.config.geometry).describe()}), ready in {time.time() - t0:.0f} s",
                  flush=True)
            opts = evaluate.Options(batch_size=16, device="cpu", baseline="knn")
            quiet = dict(log=lambda m: None)
            exact = evaluate.evaluate(model, "folder", str(root), classes, opts, **quiet)
            print("\nINP-Former, exact metrics:\n" + evaluate.markdown_table(exact))
            knn = exact["baselines"]["knn"]
            print("\nkNN baseline (PatchCore-style, same encoder):\n" + evaluate.markdown_table(knn))
            if name == "texture_ad":
                adeval = evaluate.evaluate(model, "folder", str(root), classes,
                                           evaluate.Options(batch_size=16, device="cpu", metrics="adeval"), **quiet)
                print("\n--metrics adeval minus exact, points (mean over classes; per class):")
                for k in ("P-AUROC", "P-AP", "AUPRO"):
                    per = ", ".join(f"{c} {100 * (adeval['classes'][c][k] - exact['classes'][c][k]):+.3f}"
                                    for c in exact["classes"])
                    print(f"  {k}: {100 * (adeval['mean'][k] - exact['mean'][k]):+.3f} ({per})")
            budgets = (0.1, 0.2) if name == "texture_ad" else (0.02, 0.05, 0.1)
            print("\nfalse-reject budget: calibrated on the even half of the test set, measured on the odd half")
            print("| budget P | good images calibrated on | pooled threshold | false rejects, other half | "
                  "miss rate, other half |\n|---:|---:|---:|---:|---:|")
            for budget, row in budget_rows(model, root, classes, budgets):
                if isinstance(row, str):
                    print(f"| {budget:g} | refused: {row} | | | |")
                    continue
                print(f"| {budget:g} | {row['calibration_good']} | {row['threshold']:.4f} | "
                      f"{100 * row['false_reject']:.1f} % of {row['good']} | "
                      f"{100 * row['miss']:.1f} % of {row['bad']} |")
            e = export_row(ckpt, root, classes, tmp)
            print(f"\nexport (raw frames, {e['images']} images): {e['size_mib']:.1f} MiB; score vs eager PyTorch "
                  f"{100 * e['eager_diff']:.4f} %, vs the Python path {100 * e['python_diff']:.2f} % at most; "
                  f"onnxruntime {e['onnx_ms']:.0f} ms/image, PyTorch {e['torch_ms']:.0f} ms/image", flush=True)


if __name__ == "__main__":
    main()
