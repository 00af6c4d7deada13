"""train.py: the optimiser and schedule against the official formulas, loss going down, exact resume, torchrun
DDP, the safety stops, and the end-to-end run on real photos with a real DINOv2 ViT-S/14."""
import copy
import gc
import json
import math
import os
import re
import shutil
import weakref

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import demo
import inpformer
import train
from line import weights
from conftest import expect_one_line_error, graph_on_predictions, run_main, shared

TINY_WEIGHTS = ("fixtures", "official_tiny", "backbone_hub.safetensors")


def reference_stable_adamw_step(p, g, m, v, vmax, t, lr, wd=1e-4, b1=0.9, b2=0.999, eps=1e-10):
    """One StableAdamW step written from the formula in ../shared/reference/inpformer.md section 5."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    vmax = torch.maximum(vmax, v)
    denom = vmax.sqrt() / math.sqrt(1 - b2**t) + eps
    r = max(1.0, ((g / denom).norm() / math.sqrt(g.numel())).item())
    return p - (lr / (1 - b1**t) / r) * m / denom, m, v, vmax


def test_stable_adamw_matches_the_official_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    opt = train.StableAdamW([p], lr=1e-2)
    ref, m, v, vmax = p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, 6):
        g = torch.randn(7, 5, dtype=torch.float64) * (100 if t == 3 else 1)  # t=3 triggers the RMS clip
        p.grad = g.clone()
        opt.step()
        ref, m, v, vmax = reference_stable_adamw_step(ref, g, m, v, vmax, t, lr=1e-2)
        assert torch.allclose(p.detach(), ref, rtol=1e-12, atol=1e-14), t


def test_warm_cosine_is_the_official_table():
    total, warm, base, final = 400, 100, 1e-3, 1e-4
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total - warm) / (total - warm)))
    table = np.concatenate([np.linspace(0, base, warm), cosine])
    ours = np.array([train.warm_cosine(i, total, base, final, warm) for i in range(total)])
    assert np.allclose(ours, table, rtol=0, atol=1e-15)
    assert train.warm_cosine(total + 5, total, base, final, warm) == final


def test_epoch_batches_shard_disjointly_and_replay():
    shards = [train.EpochBatches(50, 4, seed=1, rank=r, world=3) for r in range(3)]
    for s in shards:
        s.epoch = 2
    idx = [sum(list(s), []) for s in shards]
    assert all(len(i) == 16 for i in idx)  # 50 // 3 = 16 per rank, 4 full batches
    flat = sum(idx, [])
    assert len(set(flat)) == 48 and max(flat) < 50
    shards[0].skip = 3
    assert list(shards[0]) == [idx[0][12:16]]
    other = train.EpochBatches(50, 4, seed=1)
    other.epoch = 3
    assert sum(list(other), []) != sum(list(train.EpochBatches(50, 4, seed=1)), [])


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return str(demo.make_demo(tmp_path_factory.mktemp("demo") / "demo", seed=0))


def run_train(*argv, check=True):
    """train.py's command line, run in this process (see conftest.run_main)."""
    r = run_main(train.main, *argv)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def tiny_args(demo_root, out, *extra):
    return ["--data", "folder", "--data-root", demo_root, "--weights", shared(*TINY_WEIGHTS), "--image-size", 128,
            "--crop-size", 112, "--batch-size", 4, "--workers", 0, "--out", out, *extra]


def losses(stdout):
    return [float(x) for x in re.findall(r" loss ([0-9.]+) ", stdout)]


def test_loss_decreases_on_the_tiny_configuration(demo_root, tmp_path):
    r = run_train(*tiny_args(demo_root, tmp_path / "run", "--iters", 30, "--log-every", 1, "--no-eval", "--lr", 3e-3))
    got = losses(r.stdout)
    assert len(got) == 30
    assert sum(got[-5:]) / 5 < 0.8 * sum(got[:5]) / 5, got
    model = inpformer.load_model(tmp_path / "run" / "model.safetensors")
    meta = inpformer.read_checkpoint_metadata(tmp_path / "run" / "model.safetensors")
    assert meta["finished"] is True and meta["iteration"] == 30
    assert model.config.vit.embed_dim == 128 and model.config.geometry == data.ResizeCrop(128, 112).to_dict()


def interrupt_in_epoch_2(msg):
    """A log function that stops the run like a kill, at its first log line of epoch 2 (after the checkpoint of
    epoch 1 and a few more iterations)."""
    if msg.startswith("epoch 2/"):
        raise KeyboardInterrupt


def official_soft_mining_loss(en, de, y=3):
    """The official global_cosine_hm_adaptive as the reference states it (section 4.1): the gradient reaching
    each decoder pixel scaled by (d / mean d)^y through a tensor hook."""
    loss = 0.0
    for e, d in zip(en, de):
        e = e.detach()
        with torch.no_grad():
            distance = 1 - F.cosine_similarity(e, d).unsqueeze(1)
            factor = (distance / distance.mean()) ** y
        loss = loss + (1 - F.cosine_similarity(e.reshape(len(e), -1), d.reshape(len(d), -1))).mean()
        d.register_hook(lambda grad, factor=factor: grad * factor)
    return loss / len(en)


@pytest.fixture(scope="module")
def small_demo_root(tmp_path_factory):
    """16 training images (8 a class): 4 batches of 4 an epoch, so that a short run crosses epochs."""
    return str(demo.make_demo(tmp_path_factory.mktemp("small") / "demo", seed=0, n_train=8, n_test_good=2,
                              n_test_defect=2, size=160))


def test_a_whole_run_is_the_official_loop_in_float64(small_demo_root, tmp_path):
    """train.py's loop over a whole short run (warm-up, cosine, six epochs and their boundaries) equals the official
    script's loop restated from ../shared/reference/inpformer.md section 5, from the same initial weights and
    batches: the soft-mining loss through a gradient hook + 0.2 x coherence, zero_grad, backward, clip 0.1,
    StableAdamW, the scheduler's next learning rate (the forward pass is this project's, which the fixture tests
    hold to the official one). In float64, so that any other computation shows: every iteration's loss and the
    final weights to 1e-10. (bench/whole_run.py runs the official code itself, on real data.)"""
    demo_root = small_demo_root
    argv = tiny_args(demo_root, tmp_path / "run", "--iters", 24, "--warmup", 2, "--no-eval", "--save-every", "1e9")
    args = train.parse_args([str(a) for a in argv])
    (tmp_path / "run").mkdir()
    encoder = train.load_encoder(args.weights, log=lambda m: None)
    run = train.setup(args, encoder, data.resolve_sets("folder", demo_root, "all"), tmp_path / "run",
                      torch.device("cpu"), log=lambda m: None)
    assert (run.total, run.warmup, len(run.batches)) == (24, 2, 4)
    reference = copy.deepcopy(run.model).double().train()
    run.model.double()  # in place: the optimizer keeps its parameters
    ours, loss_module = [], run.net

    class RecordedFloat64Loss(torch.nn.Module):
        def forward(self, x):
            loss = loss_module(x.double())
            ours.append(loss.item())
            return loss

    run.net = RecordedFloat64Loss()
    train.train(run, log=lambda m: None)

    total, warm, base, final = 24, 2, 1e-3, 1e-4
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total - warm) / (total - warm)))
    lr_table = np.concatenate([np.linspace(0, base, warm), cosine])  # WarmCosineScheduler's table
    params = reference.trainable_parameters()
    moments = [[torch.zeros_like(p) for _ in range(3)] for p in params]
    theirs, batches = [], train.EpochBatches(len(run.dataset), 4, seed=1)
    for epoch in range(6):
        batches.epoch = epoch
        for idx in batches:
            x = torch.stack([run.dataset[i]["image"] for i in idx]).double()
            en, de, coherence = reference(x)
            loss = official_soft_mining_loss(en, de) + 0.2 * coherence
            for p in params:
                p.grad = None
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=0.1)
            step = len(theirs) + 1
            with torch.no_grad():
                for p, state in zip(params, moments):
                    new, *state[:] = reference_stable_adamw_step(p, p.grad, *state, step, lr=lr_table[step - 1])
                    p.copy_(new)
            theirs.append(loss.item())
    assert np.allclose(ours, theirs, rtol=1e-10, atol=0), np.abs(np.array(ours) / np.array(theirs) - 1).max()
    for (name, a), b in zip(run.model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name
    assert ours[-1] < 0.8 * ours[0]  # it trained


def test_resumed_run_ends_with_identical_weights(demo_root, tmp_path):
    common = ["--epochs", 3, "--no-eval", "--lr", 3e-3, "--log-every", 5, "--save-every", 0]
    straight = run_train(*tiny_args(demo_root, tmp_path / "straight", *common))
    stopped = tiny_args(demo_root, tmp_path / "stopped", *common)
    with pytest.raises(KeyboardInterrupt):
        train.main([str(a) for a in stopped], log=interrupt_in_epoch_2)
    per_epoch = inpformer.read_checkpoint_metadata(tmp_path / "stopped" / "model.safetensors")["iteration"]
    assert 0 < per_epoch < 3 * per_epoch and per_epoch % 5  # a resume in the middle of a log window
    r = run_train(*stopped, "--resume")
    assert f"resuming {tmp_path / 'stopped'} at iteration {per_epoch}/{3 * per_epoch}" in r.stdout
    # the log lines after the resume are those of the uninterrupted run, losses included
    after = [line for line in r.stdout.splitlines() if line.startswith("epoch ")]
    assert after and all(line.split(" lr ")[0] in straight.stdout for line in after), r.stdout
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # train.log holds both parts, the interrupted one and the resumed one, in order
    log = (tmp_path / "stopped" / "train.log").read_text().splitlines()
    resumed = log.index(f"resuming {tmp_path / 'stopped'} at iteration {per_epoch}/{3 * per_epoch}")
    assert any(line.startswith("epoch 1/3 ") for line in log[:resumed])
    assert log[resumed + 1:] and [line for line in log[resumed + 1:] if line.startswith("epoch ")] == after


def ddp_worker(rank, argv, port, results):
    """One torchrun process: what train.main does under torchrun, keeping this rank's trained weights."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    args = train.parse_args(argv)
    [p] = train.plan(args, lambda msg: None)
    if rank == 0:
        p.out.mkdir()
    run = train.setup(args, train.load_encoder(args.weights, log=lambda msg: None), p.sets, p.out,
                      torch.device("cpu"), lambda msg: None, rank, 2)
    train.train(run, lambda msg: None)
    torch.distributed.destroy_process_group()
    torch.save([p.detach().clone() for p in run.model.trainable_parameters()], results / f"rank{rank}.pt")


def test_torchrun_two_processes_share_weights_and_only_rank_0_writes(demo_root, tmp_path):
    out, results = tmp_path / "ddp", tmp_path / "results"
    results.mkdir()
    argv = [str(a) for a in tiny_args(demo_root, out, "--epochs", 1, "--no-eval")]
    torch.multiprocessing.spawn(ddp_worker, args=(argv, 29533, results), nprocs=2)
    w0, w1 = (torch.load(results / f"rank{r}.pt") for r in (0, 1))
    saved = inpformer.load_model(out / "model.safetensors").trainable_parameters()
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(w0, w1, saved)), "DDP ranks must agree"
    n = len(data.train_set("folder", demo_root, "all", data.ResizeCrop(128, 112)))
    meta = inpformer.read_checkpoint_metadata(out / "model.safetensors")
    assert meta["iteration"] == n // 4  # the global batch of 4: each rank takes 2 images a step
    # and the image store, whose file both processes filled with their shares (train.main removes it at the end)
    assert sorted(p.name for p in out.iterdir()) == ["image_cache", "model.safetensors", "train_state.pt"]


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(demo_root, tmp_path):
    args = train.parse_args([str(a) for a in tiny_args(demo_root, tmp_path / "nan", "--epochs", 3, "--no-eval",
                                                       "--save-every", 0)])
    [p] = train.plan(args, print)
    out = p.out
    out.mkdir()
    run = train.setup(args, train.load_encoder(args.weights), p.sets, out, torch.device("cpu"), print)

    def poison(msg):  # the weights turn NaN right after the first epoch's checkpoint
        if msg.startswith("epoch 1/"):
            run.model.prototype_token.data.fill_(float("nan"))

    with pytest.raises(ValueError) as e:
        train.train(run, poison)
    msg = str(e.value)
    per_epoch = len(run.batches)
    assert "\n" not in msg and f"loss became nan at iteration {per_epoch}" in msg and "last saved checkpoint" in msg
    meta = inpformer.read_checkpoint_metadata(out / "model.safetensors")
    assert meta["finished"] is False and meta["iteration"] == per_epoch
    model = inpformer.load_model(out / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_default_weights_download_and_offline_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INPFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "HF_WEIGHTS", "file://" + str(tmp_path / "nowhere" / "{size}.safetensors"))
    with pytest.raises(ValueError) as e:
        weights.download_backbone("small", print)
    msg = str(e.value)
    assert "\n" not in msg and "nowhere/small.safetensors" in msg and str(tmp_path / "cache") in msg
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "small.safetensors").write_bytes(shared(*TINY_WEIGHTS).read_bytes())
    monkeypatch.setattr(weights, "HF_WEIGHTS", "file://" + str(tmp_path / "hub" / "{size}.safetensors"))
    path = weights.download_backbone("small", print)
    assert path == tmp_path / "cache" / "dinov2-with-registers-small.safetensors"
    assert "downloading" in capsys.readouterr().out
    assert inpformer.load_backbone(path).config.embed_dim == 128
    assert weights.download_backbone("small", lambda m: pytest.fail("must not download twice")) == path


def test_the_bf16_training_path_trains_and_saves_fp32_weights(demo_root, tmp_path):
    """--precision bf16 on a CPU: autocast steps on a bf16 copy of the encoder; the losses stay finite and fall,
    the heads move, and the checkpoint holds fp32 weights with the fp32 encoder it started from."""
    out = tmp_path / "run"
    r = run_train(*tiny_args(demo_root, out, "--precision", "bf16", "--iters", 6, "--log-every", 1, "--no-eval",
                             "--lr", 3e-3))
    assert "precision bf16" in r.stdout
    values = losses(r.stdout)
    assert len(values) == 6 and all(math.isfinite(v) for v in values) and values[-1] < values[0]
    sd = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in sd.values())
    backbone = inpformer.load_backbone(shared(*TINY_WEIGHTS)).state_dict()
    assert all(torch.equal(sd[f"encoder.{k}"], v) for k, v in backbone.items())


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    expect_one_line_error(capsys, lambda: train.main(["--data", "demo", "--out", str(tmp_path / "run")]),
                          "--batch-size 8 is the global batch: it must divide evenly among the 3 processes")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, words", [
    (["--data", "mvtec"], ["--data-root"]),
    (["--data", "folder", "--data-root", "/nonexistent/root"], ["/nonexistent/root"]),
    (["--data", "demo", "--setting", "few-shot"], ["--shots"]),
    (["--data", "demo", "--crop-size", "100"], ["--crop-size"]),
    (["--data", "demo", "--weights", "/nonexistent/w.safetensors"], ["/nonexistent/w.safetensors"]),
    (["--data", "demo", "--tf32", "--device", "cpu"], ["--tf32", "CUDA only"]),
])
def test_bad_command_lines_fail_with_one_line(argv, words, tmp_path):
    r = run_train(*argv, "--out", tmp_path / "x", check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("argv, words", [  # a newcomer's nonsense (issue 11): each names the flag and the value
    (["--iters", "-1"], ["--iters", "'-1'", "at least 1"]),
    (["--iters", "0"], ["--iters", "'0'"]),
    (["--epochs", "0"], ["--epochs", "'0'"]),
    (["--epochs", "-1"], ["--epochs", "'-1'"]),
    (["--batch-size", "0"], ["--batch-size", "'0'"]),
    (["--inp-num", "0"], ["--inp-num", "'0'"]),
    (["--lr", "-1"], ["--lr", "'-1'", "above 0"]),
    (["--lr", "nan"], ["--lr", "'nan'"]),
    (["--workers", "-2"], ["--workers", "'-2'", "at least 0"]),
    (["--data", "mvtek"], ["--data", "'mvtek'", "known: mvtec, visa"]),
])
def test_nonsense_arguments_fail_before_anything_is_written(argv, words, tmp_path, capsys):
    full = ["--data", "demo", "--data-root", str(tmp_path / "demo"), "--out", str(tmp_path / "run"), *argv]
    expect_one_line_error(capsys, lambda: train.main(full), *words)
    assert not list(tmp_path.iterdir()), "a refused run must write nothing"


def test_an_occupied_run_folder_is_never_replaced(demo_root, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny_args(demo_root, out, "--iters", 3, "--no-eval"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_train(*tiny_args(demo_root, out, "--iters", 2, "--no-eval"), check=False)
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert str(out / "model.safetensors") in err and "finished run" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run_train(*tiny_args(demo_root, out, "--iters", 2, "--no-eval", "--overwrite"))
    assert inpformer.read_checkpoint_metadata(out / "model.safetensors")["total_iters"] == 2


def test_the_backbone_is_logged_and_a_contradicting_backbone_refused(demo_root, tmp_path):
    r = run_train(*tiny_args(demo_root, tmp_path / "a", "--iters", 1, "--no-eval"))
    assert "backbone: ViT 128 wide, 10 blocks, 2 heads, 4 registers, patch 14, from torch-hub weights" in r.stdout
    r = run_train(*tiny_args(demo_root, tmp_path / "b", "--iters", 1, "--backbone", "large"), check=False)
    assert r.returncode == 2 and "--backbone large contradicts --weights" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_loader_workers_never_exceed_the_cpus_this_process_may_use():
    cpus = len(os.sched_getaffinity(0))
    assert train.workers(None) == min(4, cpus) and train.workers(64) == cpus and train.workers(0) == 0
    assert train.parse_args(["--data", "mvtec", "--data-root", "x"]).workers == min(4, cpus)


def test_end_to_end_texture_ad_with_real_vit_small(tmp_path):
    """One multi-class model on both texture_ad classes, real DINOv2 ViT-S/14, 224 px, on the CPU; then its
    export fed raw frames decides on texture_ad as predict.py --images does (issue 25)."""
    import predict

    out = tmp_path / "e2e"
    root = shared("fixtures", "texture_ad")
    r = run_train("--data", "folder", "--data-root", root,
                  "--weights", shared("weights", "dinov2_vits14_imgfocus", "model.safetensors"),
                  "--image-size", 224, "--crop-size", 224, "--batch-size", 8, "--epochs", 2, "--lr", 2e-3,
                  "--cache-features", "--workers", 0, "--out", out)
    results = json.loads((out / "eval" / "metrics.json").read_text())
    mean = results["mean"]
    print(r.stdout)
    assert set(results["classes"]) == {"brick", "grass"}
    assert mean["I-AUROC"] >= 0.85 and mean["P-AUROC"] >= 0.93, mean
    assert "| mean |" in r.stdout.replace("**", "")

    ckpt = out / "model.safetensors"
    for argv in (["--calibrate", "--classes", "brick"], ["--export", tmp_path / "e2e.onnx", "--classes", "brick"],
                 ["--images", root / "brick" / "test" / "good", root / "brick" / "test" / "scratch", "--classes",
                  "brick", "--out", tmp_path / "pred"]):  # 20 good and 10 scratched images
        r = run_main(predict.main, "--ckpt", ckpt, "--workers", 0, *argv)
        assert r.returncode == 0, r.stdout + r.stderr
    graph = graph_on_predictions(tmp_path / "e2e.onnx", tmp_path / "pred" / "predictions.csv")
    agree = 0
    for row, (_, score, _, decision) in graph:
        assert abs(float(score[0]) - float(row["score"])) <= 0.01 * abs(float(row["score"])), row["path"]
        agree += bool(decision[0]) == (row["decision"] == "anomalous")
    assert len(graph) == 30 and agree >= 0.98 * len(graph)


def test_single_class_few_shot_and_super_multi_class_settings(demo_root, tmp_path):
    classes = data.list_classes("folder", demo_root)
    r = run_train(*tiny_args(demo_root, tmp_path / "single", "--setting", "single", "--iters", 2))
    for c in classes:  # one model per class, each knowing its class
        meta = inpformer.read_checkpoint_metadata(tmp_path / "single" / c / "model.safetensors")
        assert meta["classes"] == [c] and meta["setting"] == "single"
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [*classes, "mean"]  # one table, every class
    assert set(json.loads((tmp_path / "single" / "eval" / "metrics.json").read_text())["classes"]) == set(classes)

    r = run_train(*tiny_args(demo_root, tmp_path / "few", "--setting", "few-shot", "--shots", 1, "--epochs", 1,
                             "--no-eval"))
    per_epoch = 22 * len(classes) // 4  # each shot expanded into 22 views
    assert f"iter {per_epoch}/{per_epoch}" in r.stdout
    assert inpformer.read_checkpoint_metadata(tmp_path / "few" / "model.safetensors")["shots"] == 1

    other = demo.make_demo(tmp_path / "other", seed=1)
    r = run_train(*tiny_args(f"{demo_root},{other}", tmp_path / "super", "--iters", 2), "--data", "folder,folder")
    meta = inpformer.read_checkpoint_metadata(tmp_path / "super" / "model.safetensors")
    assert meta["data"] == "folder,folder" and meta["classes_per_set"] == [classes, data.list_classes("folder", other)]
    assert r.stdout.count("| mean |") == 2  # evaluated per data set


def test_an_image_only_data_set_trains_and_evaluates(demo_root, tmp_path):
    """MVTec layout without any ground_truth/ (image labels only): image metrics, pixel metrics null/"—"."""
    root = tmp_path / "line"
    shutil.copytree(demo_root, root, ignore=shutil.ignore_patterns("ground_truth"))
    r = run_train(*tiny_args(str(root), tmp_path / "run", "--iters", 4))
    results = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    for m in [*results["classes"].values(), results["mean"]]:
        assert 0 <= m["I-AUROC"] <= 1 and m["P-AUROC"] is None and m["AUPRO"] is None
    assert "no ground_truth/ masks, so image metrics only" in r.stdout
    assert re.search(r"^\| mean \|( [0-9.]+ \|){3}( — \|){4}$", r.stdout, re.M), r.stdout


# -----------------------------------------------------------------------------------------------------
# The main job on a GPU (issue 23): what can be checked on the CPU


def test_precision_is_fp32_unless_asked():
    args = train.parse_args(["--data", "mvtec", "--data-root", "x"])
    assert args.precision == "fp32"
    assert train.parse_args(["--data", "mvtec", "--data-root", "x", "--precision", "bf16"]).precision == "bf16"


def ddp_main(rank, argv, port, results, poison_rank=None):
    """One torchrun process running train.main; its log lines (rank 0's) and its error, if any, go to files."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if rank == poison_rank:  # this process's loss turns NaN at its third step; the other's stays finite
        forward, calls = train.LossModule.forward, []

        def poisoned(self, *a, **k):
            calls.append(1)
            loss = forward(self, *a, **k)
            return loss * float("nan") if len(calls) == 3 else loss
        train.LossModule.forward = poisoned
    lines = []
    try:
        train.main(argv, log=lines.append)
    except ValueError as e:
        (results / f"error{rank}.txt").write_text(str(e))
    (results / f"log{rank}.txt").write_text("\n".join(lines))


def test_torchrun_batch_is_global_and_the_feature_cache_is_made_once(demo_root, tmp_path):
    out, results = tmp_path / "ddp", tmp_path / "results"
    results.mkdir()
    argv = [str(a) for a in tiny_args(demo_root, out, "--epochs", 1, "--no-eval", "--cache-features")]
    torch.multiprocessing.spawn(ddp_main, args=(argv, 29541, results), nprocs=2)
    log = (results / "log0.txt").read_text()
    assert "device cpu, precision fp32, 2 processes x 2 images = global batch 4" in log, log
    n = len(data.train_set("folder", demo_root, "all", data.ResizeCrop(128, 112)))
    assert f"feature cache: encoded {n} images" in log and log.count("feature cache:") == 1
    assert not (out / "feature_cache").exists()  # removed at the end: --keep-cache was not asked
    assert inpformer.read_checkpoint_metadata(out / "model.safetensors")["iteration"] == n // 4
    with pytest.raises(SystemExit):  # a batch that does not split evenly is refused
        os.environ["WORLD_SIZE"] = "3"
        try:
            train.guard(lambda: train.main([str(a) for a in tiny_args(demo_root, tmp_path / "odd", "--no-eval")]))
        finally:
            del os.environ["WORLD_SIZE"]
    assert not (tmp_path / "odd").exists()


def test_a_nan_on_one_rank_stops_both_with_the_same_line(demo_root, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    argv = [str(a) for a in tiny_args(demo_root, tmp_path / "nan", "--epochs", 2, "--no-eval")]
    torch.multiprocessing.spawn(ddp_main, args=(argv, 29547, results, 1), nprocs=2)
    errors = [(results / f"error{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and "\n" not in errors[0] and "loss became nan at iteration 2" in errors[0]


def test_single_class_models_are_freed_before_the_next_class(demo_root, tmp_path, monkeypatch):
    """Nothing of class k (its model, encoder copy, optimizer, run) is reachable once class k+1 trains."""
    refs, alive_at_next = [], []
    setup = train.setup

    def tracked(*a, **k):
        gc.collect()
        alive_at_next.append([name for name, ref in refs if ref() is not None])
        run = setup(*a, **k)
        refs[:] = [("run", weakref.ref(run)), ("model", weakref.ref(run.model)), ("opt", weakref.ref(run.opt)),
                   ("encoder", weakref.ref(run.model.encoder)), ("net", weakref.ref(run.net))]
        return run

    monkeypatch.setattr(train, "setup", tracked)
    paths = train.main([str(a) for a in tiny_args(demo_root, tmp_path / "single", "--setting", "single",
                                                  "--iters", 2, "--no-eval")], log=lambda msg: None)
    assert [p.parent.name for p in paths] == data.list_classes("folder", demo_root)  # paths, not live models
    assert alive_at_next == [[], []], alive_at_next


def test_the_state_holds_no_encoder_and_saves_follow_the_schedule(demo_root, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny_args(demo_root, out, "--iters", 3, "--no-eval"))
    state = torch.load(out / "train_state.pt", weights_only=True)
    model = inpformer.load_model(out / "model.safetensors")
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert set(state) == {"model", "opt", "scaler", "rng", "iteration", "window", "identity"}
    assert state["model"] and not any(k.startswith("encoder.") for k in state["model"])
    # trainable weights and three AdamW/AMSGrad moments, float32, and little else
    size = (out / "train_state.pt").stat().st_size
    assert 4 * 4 * trainable <= size <= 4 * 4 * trainable * 1.1 + 200_000, (size, trainable)
    # --save-every: a run stopped in its second epoch has saved nothing yet with a long interval...
    with pytest.raises(KeyboardInterrupt):
        train.main([str(a) for a in tiny_args(demo_root, tmp_path / "late", "--epochs", 3, "--no-eval",
                                              "--save-every", 1e9)], log=interrupt_in_epoch_2)
    assert not (tmp_path / "late" / "train_state.pt").exists()
    # ...and with 0 it has saved at the end of the first epoch: state first, then the model
    with pytest.raises(KeyboardInterrupt):
        train.main([str(a) for a in tiny_args(demo_root, tmp_path / "early", "--epochs", 3, "--no-eval",
                                              "--save-every", 0)], log=interrupt_in_epoch_2)
    early = tmp_path / "early"
    assert (early / "train_state.pt").stat().st_mtime_ns <= (early / "model.safetensors").stat().st_mtime_ns


def test_resume_never_destroys(demo_root, tmp_path, capsys):
    out = tmp_path / "run"
    run_train(*tiny_args(demo_root, out, "--iters", 3, "--no-eval"))
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    # a finished run with its state: said so, exit 0, nothing changed
    r = run_train(*tiny_args(demo_root, out, "--iters", 3, "--resume"))
    assert "the run is finished; nothing to do" in r.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    # another run's settings: refused, naming what differs
    err = expect_one_line_error(capsys, lambda: train.main([str(a) for a in tiny_args(
        demo_root, out, "--iters", 3, "--classes", "tiles", "--resume")]), "classes", "train_state.pt")
    assert "fabric" in err
    # the state gone, the finished model there: refused, the model's bytes unchanged, nothing written
    (out / "train_state.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    expect_one_line_error(capsys, lambda: train.main([str(a) for a in tiny_args(demo_root, out, "--iters", 3,
                                                                                "--resume")]), "train_state.pt")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    expect_one_line_error(capsys, lambda: train.main([str(a) for a in tiny_args(demo_root, tmp_path / "none",
                                                                                "--resume")]), "no training state")
    assert not (tmp_path / "none").exists()


def test_the_feature_cache_records_what_it_was_made_from(demo_root, tmp_path):
    out = tmp_path / "run"
    base = tiny_args(demo_root, out, "--no-eval")
    r = run_train(*base, "--iters", 2, "--cache-features", "bf16", "--keep-cache")
    assert "feature cache: encoded" in r.stdout and str(out / "feature_cache") in r.stdout
    recipe = json.loads((out / "feature_cache" / "cache.json").read_text())
    assert recipe["dtype"] == "bf16" and recipe["classes"] == [["fabric", "tiles"]]
    assert recipe["geometry"]["crop_size"] == [112, 112]
    assert recipe["backbone"] == train.fingerprint(inpformer.load_backbone(shared(*TINY_WEIGHTS)))
    r = run_train(*base, "--iters", 2, "--cache-features", "bf16", "--keep-cache", "--overwrite")
    assert "feature cache: reusing" in r.stdout  # the same images, sizes, backbone and schedule
    r = run_train(*base, "--iters", 2, "--cache-features", "fp32", "--overwrite")
    assert "was made from other data or settings; making it again" in r.stdout
    assert not (out / "feature_cache").exists()


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a float tensor's value on the host, by the step they fall in (a step begins
    with the loss module's forward)."""
    READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__"}

    def __init__(self):
        super().__init__()
        self.step, self.reads = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and tensor.is_floating_point():
            to_host = name in ("cpu", "to") and tensor.device.type != "cpu" and "cpu" in map(str, args[1:])
            if name in self.READS or to_host:
                self.reads.append((self.step, name))
        return func(*args, **(kwargs or {}))


def test_no_step_reads_a_value_on_the_host_between_log_lines(demo_root, tmp_path):
    """The loop queues each step without waiting for the device: the loss is read at log lines only."""
    args = train.parse_args([str(a) for a in tiny_args(demo_root, tmp_path / "run", "--iters", 6, "--log-every", 3,
                                                       "--save-every", 1e9, "--no-eval")])
    [p] = train.plan(args, print)
    p.out.mkdir()
    run = train.setup(args, train.load_encoder(args.weights), p.sets, p.out, torch.device("cpu"), print)
    mode, forward, lines = HostReads(), run.net.forward, []

    def counted_forward(*a, **k):
        mode.step += 1
        return forward(*a, **k)

    run.net.forward = counted_forward
    with mode:
        train.train(run, lines.append)
    assert mode.step == 6 and len(lines) == 2 and all(" loss " in line for line in lines)
    between = [(step, name) for step, name in mode.reads if step % 3]
    assert not between, between
    assert {step for step, _ in mode.reads} == {3, 6}  # the log lines read the window (and the last step saves)


def test_compile_gives_the_eager_loss_and_gradients():
    """--compile runs the trainable part through torch.compile: on a small model, at each of three training steps,
    the loss and the gradients within 1e-5 (relative) of eager on the same weights. (Two runs apart would drift
    further: Adam's first steps move every weight by about lr whatever the size of its gradient, its sign
    decided by float rounding where a gradient is ~0.)"""
    torch.manual_seed(0)
    model = inpformer.INPFormer(inpformer.ViT(inpformer.ViTConfig(embed_dim=64, depth=10, num_heads=1))).train()
    eager, compiled = train.LossModule(model, model.encoder), train.LossModule(model, model.encoder, compile=True)
    params = model.trainable_parameters()
    opt, scaler = train.StableAdamW(params), torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(2, 3, 56, 56)
    for step in range(3):
        loss, eager_loss = compiled(x), eager(x)
        grads = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        eager_grads = torch.cat([g.flatten() for g in torch.autograd.grad(eager_loss, params)])
        assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=0), step
        assert (grads - eager_grads).norm() <= 1e-5 * eager_grads.norm(), step
        train.optimizer_step(eager(x), opt, scaler, params)
