"""demo.py: the demo set is seeded, complete, reused and never overwrites other files; its masks are exactly the
replaced pixels; the demo ViT is the same every run; `python demo.py DIR` writes the set."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import demo
from conftest import ROOT
from data import ResizeCrop as Geometry


def test_demo_set_is_seeded_complete_and_reused(tmp_path):
    small = dict(n_train=3, n_test_good=2, n_test_defect=3, size=128)
    a = demo.make_demo(tmp_path / "a", seed=0, **small)
    b = demo.make_demo(tmp_path / "b", seed=0, **small)
    c = demo.make_demo(tmp_path / "c", seed=1, **small)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * (3 + 2 + 3 + 3)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)

    assert data.list_classes("demo", a) == ["fabric", "tiles"]
    test = data.list_samples("demo", a, "tiles", "test")
    assert {s.defect for s in test} == {"good", "scratch", "spot", "missing"}
    for item in data.ImageDataset([s for s in test if s.label], Geometry(64, 56)):
        assert item["mask"].sum() > 0
    # Complete sets are reused, not rewritten; a different setting rewrites.
    stamp = (a / demo.DEMO_MARKER).stat().st_mtime_ns
    data.list_samples("demo", a, "tiles", "train")
    demo.make_demo(a, seed=0, **small)
    assert (a / demo.DEMO_MARKER).stat().st_mtime_ns == stamp
    demo.make_demo(a, seed=0, **dict(small, n_train=4))
    assert len(data.list_samples("demo", a, "tiles", "train")) == 4
    # Something that is not a demo set is never overwritten.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(data.DataError, match="not a demo data set"):
        demo.make_demo(tmp_path / "mine", **small)


def test_demo_masks_are_exactly_the_replaced_pixels(tmp_path):
    root = demo.make_demo(tmp_path, n_train=0, n_test_good=0, n_test_defect=3, size=128, classes=("tiles",))
    rng = np.random.default_rng([0, 0, 2, 1])                # seed, class, split "defect", image 1 (a spot)
    clean = demo._texture("tiles", rng, 128, np.float32(demo._DEMO_COLOURS["tiles"]))
    clean = (clean * 255 + 0.5).astype(np.uint8)
    image = np.asarray(Image.open(root / "tiles" / "test" / "spot" / "000.png"))
    mask = np.asarray(Image.open(root / "tiles" / "ground_truth" / "spot" / "000_mask.png"))
    changed = (image != clean).any(-1)
    assert set(np.unique(mask)) == {0, 255}
    assert not (changed & (mask == 0)).any() and changed[mask > 0].mean() > 0.95


def test_demo_backbone_is_the_same_every_run_and_says_where_it_comes_from():
    a, b = demo.backbone(), demo.backbone()
    assert a.source == "random (demo)" and a.config.embed_dim == 128 and a.config.num_register_tokens == 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_command_writes_the_set_and_refuses_a_foreign_folder(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "demo.py"), str(tmp_path / "set")], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "set" / demo.DEMO_MARKER).is_file(), r.stderr
    assert data.list_classes("demo", tmp_path / "set") == ["fabric", "tiles"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "demo.py"), str(tmp_path / "mine")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a demo data set" in r.stderr
