"""The reference core's shape: inpformer.py and metrics.py stand alone (they import no project module, and
inpformer.py copied into an empty folder reproduces the official fixture), and no line is over 120 characters."""
import ast
import subprocess
import sys

from conftest import ROOT, shared


def imported_modules(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_inpformer_and_metrics_import_no_project_module():
    project = {p.stem for p in ROOT.glob("*.py")} | {"line"}
    for name in ("inpformer.py", "metrics.py"):
        assert not imported_modules(ROOT / name) & project, name


def test_inpformer_copied_alone_reproduces_the_official_fixture(tmp_path):
    """In a folder with nothing else of the project: the authors' state dict loads and its 256 x 256 maps and
    scores are the official code's."""
    (tmp_path / "inpformer.py").write_text((ROOT / "inpformer.py").read_text())
    script = f"""
import torch
from safetensors.torch import load_file
import inpformer
io = load_file({str(shared("fixtures", "official_tiny", "io.safetensors"))!r})
model = inpformer.load_model({str(shared("fixtures", "official_tiny", "inpformer_official.safetensors"))!r})
for size in (224, 392):
    maps, scores = model.predict(io[f"x_{{size}}"])
    for got, ref in ((maps, io[f"map256_{{size}}"]), (scores, io[f"score256_{{size}}"])):
        ref = ref.reshape(got.shape)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), size
print("same maps")
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip() == "same maps", r.stdout + r.stderr


def test_no_line_of_the_project_is_over_120_characters():
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "line").glob("*.py"))
    long = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1) if len(line) > 120]
    assert not long


def test_the_papers_path_runs_the_core_alone(demo, tmp_path):
    """`train.py --data demo` (its evaluation included) and evaluate.py on the authors' checkpoint load no module of
    line/: the reference core runs the paper's path by itself. The demo set is written into this test's own folder:
    --data demo rewrites a demo set of other settings, and the session's small one is shared."""
    ckpt = shared("fixtures", "official_tiny", "inpformer_official.safetensors")
    sizes = ["--image-size", "128", "--crop-size", "112", "--workers", "0"]
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import evaluate, train
train.main(["--data", "demo", "--data-root", {str(tmp_path / "demo")!r}, "--iters", "2", "--batch-size", "4",
            "--out", {str(tmp_path / "run")!r}, *{sizes!r}])
assert evaluate.main(["--ckpt", {str(ckpt)!r}, "--data", "folder", "--data-root", {demo!r}, "--classes", "tiles",
                      "--out", {str(tmp_path / "eval")!r}, *{sizes!r}]) == 0
print("line modules:", sorted(m for m in sys.modules if m == "line" or m.startswith("line.")))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "line modules: []" in r.stdout, r.stdout
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "metrics.json").is_file()
