"""The official training loop and train.py's over whole runs on the same data: first from the same start, then
each from its own seeds (issue 33).

    python bench/whole_run.py --official /path/to/INP-Former          # texture_ad brick+grass, ViT-S, 256 -> 224
    python bench/whole_run.py --official DIR --data-root ../shared/fixtures/real_ad --classes magnetic_tile

Part 1, same start: the official loop gets train.py's initial weights and train.py's batch order, both loops in
float32 and in float64; the loss of every iteration side by side, then for each pair the largest relative
difference and the first iteration where the two part by more than --tolerance. Part 2, own seeds: each loop as
it runs alone (the official script's setup_seed, initialisation and shuffled DataLoader; train.py's setup), then
both models scored by evaluate.py's exact metrics, so the table compares training only. The official loop is
the script's (INP_Former_Multi_Class.py) with its own data loading, StableAdamW, WarmCosineScheduler and loss,
except that its warm-up and length are this run's (train.py's capped warm-up, --iters: the script can only stop
at the end of an epoch).

DIR is a checkout of luow23/INP-Former; its data loading needs torchvision (not a dependency of this project).
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import evaluate  # noqa: E402
import inpformer  # noqa: E402
import official  # noqa: E402
import train  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
COLUMNS = ("I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO")


def import_official(path):
    """The official modules, torchvision included. A CPU build of torch cannot load a CUDA torchvision's
    compiled operators (nms, roi_align): their fake-tensor registrations are skipped, the transforms are Python."""
    real = torch.library.register_fake

    def lenient(op, *args, **kwargs):
        register = real(op, *args, **kwargs)

        def decorate(fn):
            try:
                return register(fn)
            except RuntimeError:  # the operator's compiled library did not load
                return fn
        return decorate

    torch.library.register_fake = lenient
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = real
    return official.import_modules(path)


class Recorder(nn.Module):
    """train.py's loss module, fed images in `dtype`, recording the loss of every step (the loop is left as it
    is)."""

    def __init__(self, net, dtype=torch.float32):
        super().__init__()
        self.net, self.dtype, self.losses = net, dtype, []

    def forward(self, x):
        loss = self.net(x.to(self.dtype))
        self.losses.append(loss.item())
        return loss


def ours(args, seed, out, dtype=torch.float32):
    """train.py's setup and loop for one seed: (the initial trainable weights, the TrainingRun after its last
    iteration, the loss of every iteration)."""
    argv = ["--data", "folder", "--data-root", str(args.data_root), "--classes", args.classes,
            "--weights", str(args.weights), "--image-size", str(args.image_size), "--crop-size", str(args.crop_size),
            "--batch-size", str(args.batch_size), "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--seed", str(seed), "--workers", str(args.workers), "--out", str(out), "--no-eval", "--save-every", "1e9"]
    targs = train.parse_args(argv)
    out.mkdir(parents=True)
    encoder = train.load_encoder(targs.weights, log=lambda m: None)
    sets = data.resolve_sets(targs.data, targs.data_root, targs.classes)
    run = train.setup(targs, encoder, sets, out, torch.device("cpu"), log=lambda m: None)
    start = {k: v.clone() for k, v in run.model.state_dict().items() if not k.startswith("encoder.")}
    run.model.to(dtype)  # in place, the encoder too (in fp32, train.py's step runs the model's own)
    recorder = run.net = Recorder(run.net, dtype)
    train.train(run, log=lambda m: None)
    return start, run, recorder.losses


def official_run(args, seed, warmup, start=None, batches=None, our_paths=None, dtype=torch.float32):
    """The official multi-class loop: (model, the loss of every iteration). With `start` (trainable weights) and
    `batches` (a train.EpochBatches) it starts from those weights and takes its batches in that order."""
    imp = import_official(args.official)
    utils, dataset, vit_encoder = imp("utils"), imp("dataset"), imp("models.vit_encoder")
    stable = imp("optimizers.StableAdamW")
    from torchvision.datasets import ImageFolder

    width = args.width
    utils.setup_seed(seed)  # the script's order from here on: data, encoder, heads, initialisation
    transform, _ = dataset.get_data_transforms(args.image_size, args.crop_size)
    parts = []
    for i, item in enumerate(args.classes.split(",")):
        part = ImageFolder(root=str(args.data_root / item / "train"), transform=transform)
        part.samples = [(s[0], i) for s in part.samples]
        parts.append(part)
    train_data = torch.utils.data.ConcatDataset(parts)
    paths = [p for part in parts for p, _ in part.samples]
    if our_paths is not None and [str(Path(p)) for p in paths] != [str(Path(p)) for p in our_paths]:
        raise SystemExit("the official ImageFolder lists the training images in another order than train.py")
    if batches is None:
        loader = torch.utils.data.DataLoader(train_data, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.workers, drop_last=True)
    else:
        loader = torch.utils.data.DataLoader(train_data, batch_sampler=batches, num_workers=args.workers)

    # The script's encoder: vit_encoder.load, its download pointed at the weights given (saved in hub names).
    vit_encoder.download_cached_file = lambda url, **kw: str(args.hub_weights)
    size = {384: "small", 768: "base", 1024: "large"}[width]
    registers = "reg" if args.registers else ""
    encoder = vit_encoder.load(f"dinov2{registers}_vit_{size}_14")
    for k, v in encoder.state_dict().items():
        if not torch.equal(v, args.backbone[k]):
            raise SystemExit(f"the official encoder did not load {k} from {args.weights}")
    model = official.build(args.official, size, inp_num=6, encoder=encoder)
    inp = nn.ParameterList([model.prototype_token])  # the script's INP list, holding the same parameter
    trainable = nn.ModuleList([model.bottleneck, model.decoder, model.aggregation, inp])
    for m in trainable.modules():  # the script's initialisation
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
    model.to(dtype)
    if start is not None:
        missing, unexpected = model.load_state_dict(start, strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise SystemExit(f"train.py's weights do not fit the official model: {unexpected or missing}")
    optimizer = stable.StableAdamW([{"params": trainable.parameters()}], lr=1e-3, betas=(0.9, 0.999),
                                   weight_decay=1e-4, amsgrad=True, eps=1e-10)
    scheduler = utils.WarmCosineScheduler(optimizer, base_value=1e-3, final_value=1e-4, total_iters=args.iters,
                                          warmup_iters=warmup)
    losses, epoch = [], 0
    while len(losses) < args.iters:
        if batches is not None:
            batches.epoch = epoch
        model.train()
        for img, _ in loader:
            en, de, g_loss = model(img.to(dtype))
            loss = utils.global_cosine_hm_adaptive(en, de, y=3)
            loss = loss + 0.2 * g_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(trainable.parameters(), max_norm=0.1)
            optimizer.step()
            losses.append(loss.item())
            scheduler.step()
            if len(losses) == args.iters:
                break
        epoch += 1
    return model, losses


def same_start(args, log):
    """Both loops from train.py's initial weights in train.py's batch order, in float32 and in float64: in
    float64 a different computation shows, in float32 the round-off that each loop's own float64 run measures."""
    losses = {}
    for dtype, name in ((torch.float32, "float32"), (torch.float64, "float64")):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            start, run, losses["train.py", dtype] = ours(args, args.seeds[0], Path(tmp) / "ours", dtype)
            our_paths = [s.image for part in run.dataset.datasets for s in part.samples]
            batches = train.EpochBatches(len(run.dataset), args.batch_size, args.seeds[0])
            t1 = time.time()
            _, losses["official", dtype] = official_run(args, args.seeds[0], run.warmup, start, batches, our_paths,
                                                        dtype)
            log(f"{name}: train.py {t1 - t0:.0f} s, official {time.time() - t1:.0f} s (setup included)")
    f32, f64 = torch.float32, torch.float64
    pairs = {"train.py vs official, float32": (losses["train.py", f32], losses["official", f32]),
             "train.py vs official, float64": (losses["train.py", f64], losses["official", f64]),
             "train.py float32 vs float64": (losses["train.py", f32], losses["train.py", f64]),
             "official float32 vs float64": (losses["official", f32], losses["official", f64])}
    log("iteration  " + "  ".join(f"{name:>12}" for name in ("train.py f32", "official f32", "train.py f64",
                                                               "official f64")))
    ours32, theirs32, ours64, theirs64 = (losses[k] for k in [("train.py", f32), ("official", f32),
                                                               ("train.py", f64), ("official", f64)])
    for i in range(args.iters):
        log(f"{i + 1:9d}  " + "  ".join(f"{v[i]:12.8f}" for v in (ours32, theirs32, ours64, theirs64)))
    for name, (a, b) in pairs.items():
        rel = [abs(x - y) / abs(y) for x, y in zip(a, b)]
        worst = max(range(len(rel)), key=rel.__getitem__)
        parted = next((i for i, r in enumerate(rel) if r > args.tolerance), None)
        log(f"{name}: largest relative difference {rel[worst]:.2e} at iteration {worst + 1}, mean of the last 50 "
            f"{statistics.mean(a[-50:]):.5f} vs {statistics.mean(b[-50:]):.5f}; "
            + (f"first above {args.tolerance:g} at iteration {parted + 1}" if parted is not None
               else f"never above {args.tolerance:g}"))
    return losses


def own_seeds(args, log):
    """Each loop alone, seed by seed, both trained models scored by evaluate.py; the table of their metrics, their
    means and ranges, and whether the means of the two loops lie within the seeds' range of each other."""
    rows = {"official": [], "train.py": []}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            _, run, losses = ours(args, seed, Path(tmp) / "ours")
            rows["train.py"].append(score(args, run.model, losses))
            log(f"train.py seed {seed}: {table_cells(rows['train.py'][-1])} ({time.time() - t0:.0f} s)")
            t0 = time.time()
            their_model, losses = official_run(args, seed, run.warmup)
            model = copy.deepcopy(run.model)
            model.load_state_dict(their_model.state_dict())  # the official model scored by the same code
            rows["official"].append(score(args, model, losses))
            log(f"official seed {seed}: {table_cells(rows['official'][-1])} ({time.time() - t0:.0f} s)")
    log(f"| run | {' | '.join(COLUMNS)} | loss, mean of the last 50 |")
    log("|---|" + "---:|" * (len(COLUMNS) + 1))
    for name, results in rows.items():
        for seed, r in zip(args.seeds, results):
            log(f"| {name}, seed {seed} | {table_cells(r, ' | ')} |")
    for name, results in rows.items():
        cells = []
        for k in (*COLUMNS, "loss"):
            values = [r[k] for r in results]
            cells.append(f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        log(f"| {name}, mean (range) | {' | '.join(cells)} |")
    for k in (*COLUMNS, "loss"):
        a, b = ([r[k] for r in rows[n]] for n in ("official", "train.py"))
        gap = abs(statistics.mean(a) - statistics.mean(b))
        spread = max(max(a) - min(a), max(b) - min(b))
        log(f"{k}: means {gap:.3f} apart, seeds' spread {spread:.3f}: {'within' if gap <= spread else 'OUTSIDE'}")
    return rows


def score(args, model, losses):
    """evaluate.py's mean metrics of `model` on the test sets (percent), and the mean of the last 50 losses."""
    opts = evaluate.Options(batch_size=16, device="cpu", workers=args.workers)
    results = evaluate.evaluate(model.eval(), "folder", str(args.data_root), args.classes, opts, log=lambda m: None)
    row = {k: 100 * results["mean"][k] for k in COLUMNS}
    row["loss"] = statistics.mean(losses[-50:])
    return row


def table_cells(row, sep=" "):
    return sep.join(f"{row[k]:.1f}" for k in COLUMNS) + f"{sep}{row['loss']:.4f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="a checkout of luow23/INP-Former")
    p.add_argument("--data-root", type=Path, default=SHARED / "fixtures" / "texture_ad")
    p.add_argument("--classes", default="brick,grass")
    p.add_argument("--weights", type=Path, default=SHARED / "weights" / "dinov2_vits14_imgfocus" / "model.safetensors")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30, help="warm-up iterations of both loops (train.py caps it at "
                                                          "a tenth of the run)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-6, help="relative loss difference taken as parting")
    p.add_argument("--part", choices=["same-start", "own-seeds", "both"], default="both")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    log = print
    backbone = inpformer.load_backbone(args.weights)
    args.width, args.registers = backbone.config.embed_dim, backbone.config.num_register_tokens > 0
    args.backbone = backbone.state_dict()  # what the official encoder must load
    with tempfile.TemporaryDirectory() as tmp:
        args.hub_weights = Path(tmp) / "backbone.pth"  # what the official vit_encoder.load reads
        torch.save(args.backbone, args.hub_weights)
        log(f"data {args.data_root} ({args.classes}), {args.image_size} -> {args.crop_size}, batch {args.batch_size}, "
            f"{args.iters} iterations, warm-up {args.warmup}, torch {torch.__version__}, {torch.get_num_threads()} "
            "threads")
        if args.part in ("same-start", "both"):
            same_start(args, log)
        if args.part in ("own-seeds", "both"):
            own_seeds(args, log)


if __name__ == "__main__":
    main()
