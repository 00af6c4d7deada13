"""The README's commands: the ones that need no download run as written; every other train.py/evaluate.py/
predict.py/data.py/demo.py command line in it is accepted by the script's argument parser."""
import csv
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import data
import demo
import evaluate
import predict
import train
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def section(title):
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def commands(text):
    """Command lines of the ```bash blocks of `text`, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def table(text):
    """{class: [seven numbers]} of the Markdown metrics table in `text`."""
    rows = re.findall(r"^\| (\w+) \|" + r" ([0-9.]+) \|" * 7 + "$", text, re.M)
    return {m[0]: [float(v) for v in m[1:]] for m in rows}


def assert_the_readmes_table(stdout, kernel):
    """The README's demo table is what `python train.py --data demo` prints, whatever the CPU kernels: mean I-AUROC
    and P-AUROC within 1.5 points of it, every number within 4."""
    want, got = table(section("The main job, with nothing downloaded")), table(stdout)
    assert set(want) == {"fabric", "tiles", "mean"} and set(got) == set(want), stdout
    for cls in want:
        names = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")
        for name, g, w in zip(names, got[cls], want[cls]):
            limit = 1.5 if cls == "mean" and name in ("I-AUROC", "P-AUROC") else 4.0
            assert abs(g - w) <= limit, f"{kernel}: {cls} {name} {g} vs the README's {w}\n{stdout}"


def environment(kernel):
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    return env if kernel == "default" else {**env, "ATEN_CPU_CAPABILITY": kernel}


DEMO_TABLES = {}  # the CPU kernels a `python train.py --data demo` run used ("AVX2", "AVX512", ...) -> its stdout


def kernels(kernel):
    """The ATen CPU kernels a process started with environment(kernel) runs ("DEFAULT", "AVX2", "AVX512"...)."""
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                       capture_output=True, text=True, env=environment(kernel), check=True)
    return r.stdout.strip()


def test_main_job_runs_as_written(tmp_path):
    """`python train.py --data demo` (printing the README's table under the default CPU kernels, AVX512 where the
    CPU has it) and the evaluate commands after it, in a fresh copy of the project."""
    for f in ROOT.glob("*.py"):
        shutil.copy(f, tmp_path)
    shutil.copytree(ROOT / "line", tmp_path / "line", ignore=shutil.ignore_patterns("__pycache__"))
    cmds = commands(section("The main job, with nothing downloaded"))
    assert cmds[0] == "python train.py --data demo" and len(cmds) >= 3
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[0] == "python"
        r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                           env=environment("default"))
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        if cmd == cmds[0]:
            assert "randomly initialised ViT" in r.stdout
            assert_the_readmes_table(r.stdout, "default")
            DEMO_TABLES[kernels("default")] = r.stdout
    assert (tmp_path / "runs" / "demo-multi" / "eval" / "metrics.json").is_file()
    assert list((tmp_path / "runs" / "demo-multi" / "eval" / "maps").rglob("*.png"))
    with open(tmp_path / "runs" / "demo-multi" / "predictions" / "predictions.csv") as f:
        assert all(row["decision"] == "anomalous" for row in csv.DictReader(f))  # calibrated: decisions
    recipe = re.search(r"\*\*From Python\*\*.*?```python\n(.*?)```", README, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", recipe], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split()[0] == "anomalous", r.stdout + r.stderr


def test_the_demo_prints_the_readmes_table_under_avx2_kernels(tmp_path):
    """The same table on CPUs without AVX512 (the default kernels are checked by the main-job test above). Where
    the default kernels are AVX2 already, the main-job test's run was this run: its table is checked again here."""
    stdout = DEMO_TABLES.get(kernels("avx2"))
    if stdout is None:
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "demo", "--data-root",
                            str(tmp_path / "demo"), "--out", str(tmp_path / "avx2")], capture_output=True, text=True,
                           env=environment("avx2"))
        assert r.returncode == 0, r.stdout + r.stderr
        stdout = r.stdout
    assert_the_readmes_table(stdout, "avx2")


def test_set_up_commands_are_the_two_promised():
    assert commands(section("Set up")) == ["pip install -r requirements.txt", "python -m pytest -q"]


PARSERS = {"train.py": train.parse_args, "evaluate.py": evaluate.parse_args, "predict.py": predict.parse_args,
           "data.py": data.main, "demo.py": demo.main}
COMMANDS = [c for c in commands(README) + re.findall(r"`(python \w+\.py [^`]*)`", README)
            if re.search(r"\b(train|evaluate|predict|data|demo)\.py\b", c)]


def test_every_script_is_in_the_readme():
    assert {next(a for a in shlex.split(c) if a.endswith(".py")) for c in COMMANDS} == set(PARSERS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_line_parses(cmd):
    argv = shlex.split(cmd)
    script = next(a for a in argv if a.endswith(".py"))
    rest = argv[argv.index(script) + 1:]
    if script in ("data.py", "demo.py"):  # these run at once: check their options against --help
        r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and all(opt in r.stdout for opt in rest if opt.startswith("--")), cmd
        return
    try:
        PARSERS[script](rest)
    except ValueError as e:  # a missing data set or checkpoint is fine here: only the syntax is checked
        assert "see --help" not in str(e), f"{cmd}: {e}"  # the parser's own complaint
