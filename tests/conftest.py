"""Shared test helpers: where the read-only fixtures live, and one small demo set with a checkpoint trained on it
that the evaluate and predict tests share (trained once per session)."""
import contextlib
import io
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INPFORMER_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import demo as demo_set  # noqa: E402  (`demo` is the fixture below)
import inpformer  # noqa: E402
import train  # noqa: E402

IMAGE, CROP, BATCH = 128, 112, 4
GEOMETRY = data.ResizeCrop(IMAGE, CROP)
DEMO_SIZE = 160  # demo images larger than IMAGE, so that --full-res has a real resize to undo


def graph_on_predictions(onnx_path, predictions_csv):
    """Each row of a predictions.csv with the outputs of an exported graph fed the row's file as a raw frame:
    [(row, [anomaly_map, score, normalised_score, decision])]."""
    import csv

    import onnxruntime  # an optional extra for users; CI installs it
    import predict

    with open(predictions_csv) as f:
        rows = list(csv.DictReader(f))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return [(row, session.run(None, {"frames": predict.raw_frame(row["path"])[None]})) for row in rows]


def run_main(main, *argv):
    """A script's main(argv) in this process, as its command line runs it (through train.guard): the exit status
    and what it printed, as subprocess.run reports them, without a new interpreter for every call."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            train.guard(lambda: main([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code or 0
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def expect_one_line_error(capsys, main, *words):
    """main() through train.guard ends with exit status 2 and one line "error: ..." on stderr holding every word."""
    with pytest.raises(SystemExit) as e:
        train.guard(main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def shared(*parts) -> Path:
    """Path of a file under ../shared; the test fails loudly (never skips) when it is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"missing shared fixture {p} (set INPFORMER_SHARED to the shared/ folder)")
    return p


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo set: 8 training images, 4 good and 6 defective test images per class, 160 px."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    return str(demo_set.make_demo(root, seed=0, n_train=8, n_test_good=4, n_test_defect=6, size=DEMO_SIZE))


@pytest.fixture(scope="session")
def ckpt(demo, tmp_path_factory):
    """A tiny INP-Former (64-wide, one 64-wide head) after a few Adam steps on the small demo set, saved as
    train.py saves checkpoints."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread gains nothing, and competes with the other core's work
    torch.manual_seed(0)
    vit = inpformer.ViTConfig(embed_dim=64, depth=10, num_heads=1, num_register_tokens=0)
    model = inpformer.INPFormer(inpformer.ViT(vit), inp_num=4, decoder_depth=8, geometry=GEOMETRY.to_dict())
    train = torch.utils.data.DataLoader(data.train_set("folder", demo, "all", GEOMETRY), batch_size=8,
                                        shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        for batch in train:
            loss = model.loss(batch["image"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("run") / "model.safetensors"
    meta = dict(data="folder", data_root=demo, classes=data.list_classes("folder", demo), setting="multi",
                backbone="tiny")
    inpformer.save_checkpoint(model.eval(), path, meta)
    torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="session")
def model(ckpt):
    """The tiny checkpoint, loaded once: tests must not change it."""
    return inpformer.load_model(ckpt)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: a second thread gains nothing, and where other jobs share
    the cores, OpenMP's spinning threads make such small ops 10-50x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
