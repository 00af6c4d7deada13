"""Train INP-Former: the official recipe for every setting, on one device or under torchrun DDP.

    python train.py --data demo                                          # built-in demo data, no download
    python train.py --data mvtec --data-root /data/mvtec_anomaly_detection --classes all
    python train.py --data visa --data-root /data/VisA_pytorch/1cls --setting single
    python train.py --data mvtec --data-root /data/mvtec --setting few-shot --shots 4
    python train.py --data mvtec,visa,realiad --data-root /data/mvtec,/data/visa,/data/Real-IAD
    torchrun --nproc_per_node=4 train.py --data mvtec --data-root /data/mvtec
    python train.py --data mvtec --data-root /data/mvtec --out runs/x --resume     # continue a stopped run

Defaults are the official multi-class recipe: DINOv2-B/14 with registers, 448 -> 392, batch 16, 6 INPs,
StableAdamW (lr 1e-3, betas 0.9/0.999, weight decay 1e-4, AMSGrad, eps 1e-10), 100 warm-up iterations then
cosine to lr/10, gradient-norm clipping 0.1, 200 epochs, seed 1; bf16 autocast on CUDA (fp16 with a gradient
scaler on request), fp32 on the CPU (bf16 on request). Under torchrun each process loads --batch-size images
per step (the paper's recipe is 16 in all, on one GPU), the data is sharded with one seeded permutation per
epoch, and only rank 0 writes. Every epoch `<out>/model.safetensors` (what `evaluate.py --ckpt` reads) and
`<out>/train_state.pt` (optimizer, RNG, position) are written atomically; `--resume` continues from them and
ends with the same weights as an uninterrupted run. A new run never replaces one unless told (--overwrite).
"""
import argparse
import copy
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import evaluate
import inpformer

# -----------------------------------------------------------------------------------------------------
# Optimiser and schedule

class StableAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay, optional AMSGrad, and per-tensor update clipping: each tensor's step
    is divided by max(1, RMS(g / denom)), which keeps rare huge gradients from blowing up the update."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-4, amsgrad=True,
                 clip_threshold=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      clip_threshold=clip_threshold))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                g, state = p.grad, self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                t = state["step"] = state["step"] + 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group["amsgrad"]:
                    v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                rms = (g / denom).norm() / math.sqrt(g.numel())
                scale = torch.clamp(rms / group["clip_threshold"], min=1.0)
                p.addcdiv_(state["exp_avg"], denom * scale, value=-group["lr"] / (1 - beta1**t))

def optimizer_step(loss, opt, scaler, params, max_norm=0.1):
    """Backward, then the official global gradient-norm clipping (on unscaled fp16 gradients), then a step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
    scaler.step(opt)
    scaler.update()

def warm_cosine(it, total, base, final, warmup):
    """Learning rate of iteration `it`: linear from 0 over `warmup` iterations, then cosine from base to final."""
    if it < warmup:
        return base * it / max(1, warmup - 1)
    if it >= total:
        return final
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (it - warmup) / (total - warmup)))

class EpochBatches(torch.utils.data.Sampler):
    """Batches of one epoch: permutation seeded by (seed, epoch), every world-th index from `rank`, no partial
    batch; the first `skip` batches are left out when resuming mid-epoch. So a resumed run replays the order."""

    def __init__(self, n, batch_size, seed, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.skip = 0, 0

    def __len__(self):
        return self.n // self.world // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        idx = torch.randperm(self.n, generator=g)[: len(self) * self.batch_size * self.world][self.rank :: self.world]
        for b in range(self.skip, len(self)):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size].tolist()

class LossModule(torch.nn.Module):
    """model.loss (or, on cached features, loss_from_features) as a forward(), for DistributedDataParallel."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x=None, features=None):
        return self.model.loss(x) if features is None else self.model.loss_from_features(*features)

def cache_features(model, dataset, args, device, amp):
    """The frozen encoder's outputs for every training image, (en groups, fused, grid), on the CPU in the
    --cache-features dtype. The training images are not augmented on the fly, so these never change."""
    en, fused, dtype = [], [], evaluate.DTYPES[args.cache_features]
    for batch in torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers):
        with amp:
            e, f = model.encode(batch["image"].to(device))
        en.append(torch.stack(e, 1).to("cpu", dtype))
        fused.append(f.to("cpu", dtype))
    return torch.cat(en), torch.cat(fused), model.token_grid(batch["image"])

def save_state(path, run, it):
    """Everything --resume needs (trainable weights, optimizer, RNG, position, log window), as one atomic file."""
    state = dict(model={k: v for k, v in run.model.state_dict().items() if not k.startswith("encoder.")},
                 opt=run.opt.state_dict(), rng=torch.get_rng_state(), iteration=it, window=run.window, meta=run.meta)
    with inpformer.atomic_write(path) as tmp:
        torch.save(state, tmp)

def load_state(path, run):
    """Restore what save_state wrote; returns the iteration to continue at."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = run.model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise KeyError((unexpected or missing)[0])
        run.opt.load_state_dict(state["opt"])
    except Exception as e:
        raise ValueError(f"{path}: not a training state of this model ({inpformer._first_line(e)}); use the same "
                         "--weights/--inp-num as the run it comes from, or another --out") from None
    if state["meta"]["total_iters"] != run.total:
        raise ValueError(f"{path}: saved for {state['meta']['total_iters']} iterations, this run has {run.total}; "
                         "resume with the same --epochs/--iters/--batch-size")
    torch.set_rng_state(state["rng"])
    run.window = state["window"]
    return state["iteration"]

# -----------------------------------------------------------------------------------------------------
# One training run: setup, then the loop

def setup(args, encoder, sets, out, device, log, rank=0, world=1):
    """Model, data, optimiser and schedule for one model (on a copy of `encoder`) trained on the union of
    `sets` [(data, root, classes)], restored from `out` with --resume."""
    torch.manual_seed(args.seed)
    model = inpformer.INPFormer(copy.deepcopy(encoder), inp_num=args.inp_num).to(device)
    dataset = torch.utils.data.ConcatDataset([data.train_set(d, r, cs, args.image_size, args.crop_size, check=False,
                                              shots=args.shots, seed=args.seed) for d, r, cs in sets])  # plan() checked
    batches = EpochBatches(len(dataset), args.batch_size, args.seed, rank, world)
    if len(batches) == 0:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch of {args.batch_size} x "
                         f"{world} process(es): lower --batch-size")
    total = args.iters or args.epochs * len(batches)
    meta = dict(data=",".join(d for d, _, _ in sets), data_root=",".join(str(r) for _, r, _ in sets),
                classes=[c for _, _, cs in sets for c in cs], classes_per_set=[cs for _, _, cs in sets],
                image_size=args.image_size, crop_size=args.crop_size, setting=args.setting, shots=args.shots,
                backbone=str(args.weights or ("random-demo" if args.data == "demo" else args.backbone or "base")),
                seed=args.seed, total_iters=total)
    amp = torch.autocast(device.type, dtype=evaluate.DTYPES[args.precision], enabled=args.precision in ("bf16", "fp16"))
    run = SimpleNamespace(model=model, dataset=dataset, batches=batches, total=total, out=out, meta=meta, amp=amp,
                          opt=StableAdamW(model.trainable_parameters(), lr=args.lr, weight_decay=1e-4), window=[0.0, 0],
                          scaler=torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"), device=device,
                          warmup=min(args.warmup, total // 10),  # a short run still spends most of it at full lr
                          net=LossModule(model), features=None, start=0, args=args, rank=rank, world=world)
    if args.resume and (out / "train_state.pt").is_file():
        run.start = load_state(out / "train_state.pt", run)
        log(f"resuming {out} at iteration {run.start}/{total}")
    if world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(run.net, None if device.index is None else [device.index])
    if args.cache_features and run.start < total:
        t0 = time.time()
        run.features = cache_features(model, dataset, args, device, amp)
        log(f"cached encoder features of {len(dataset)} images in {time.time() - t0:.0f}s "
            f"({(run.features[0].nbytes + run.features[1].nbytes) / 2**30:.2f} GiB)")
    return run

def train(run, log):
    """The loop: one step per batch, a checkpoint at the end of every epoch."""
    args, model, batches, total = run.args, run.model, run.batches, run.total
    ckpt, per_epoch, it, t0 = run.out / "model.safetensors", len(batches), run.start, time.time()
    loader = None if run.features else torch.utils.data.DataLoader(
        run.dataset, batch_sampler=batches, num_workers=args.workers, pin_memory=run.device.type == "cuda",
        persistent_workers=args.workers > 0)
    model.train()
    while it < total:
        batches.epoch, batches.skip = it // per_epoch, it % per_epoch
        # the loader consumes the same batch sampler, so zip pairs each batch with its indices
        for idx, batch in zip(batches, loader) if loader else ((idx, None) for idx in batches):
            for g in run.opt.param_groups:
                g["lr"] = warm_cosine(it, total, args.lr, args.lr * 0.1, run.warmup)
            with run.amp:
                if run.features:
                    en, fused, grid = run.features
                    fp32 = dict(device=run.device, dtype=torch.float32)
                    loss = run.net(features=(list(en[idx].to(**fp32).unbind(1)), fused[idx].to(**fp32), grid))
                else:
                    loss = run.net(batch["image"].to(run.device, non_blocking=True))
            value = loss.item()
            if not math.isfinite(value):
                kept = f"the last good checkpoint {ckpt} is kept" if ckpt.is_file() else "no checkpoint was written"
                raise ValueError(f"loss became {value} at iteration {it} (epoch {it // per_epoch + 1}); {kept}. "
                                 "Try --precision fp32 or a lower --lr")
            optimizer_step(loss, run.opt, run.scaler, model.trainable_parameters())
            it += 1
            run.window = [run.window[0] + value, run.window[1] + 1]  # the losses since the last log line
            end_of_epoch = it % per_epoch == 0 or it == total
            line = None  # logged after the checkpoint
            if it % (args.log_every or per_epoch) == 0 or it == total:
                eta, ips = (time.time() - t0) / (it - run.start) * (total - it), (it - run.start) * args.batch_size * run.world
                line = (f"epoch {math.ceil(it / per_epoch)}/{math.ceil(total / per_epoch)} iter {it}/{total} loss "
                        f"{run.window[0] / run.window[1]:.4f} lr {run.opt.param_groups[0]['lr']:.2e} "
                        f"{ips / (time.time() - t0):.1f} img/s ETA {data.format_time(eta)}")
                run.window = [0.0, 0]
            if run.rank == 0 and end_of_epoch:  # saved with the log window, so a resumed run logs the same losses
                save_state(run.out / "train_state.pt", run, it)
                inpformer.save_checkpoint(model, ckpt, dict(run.meta, iteration=it, finished=it == total))
            if line:
                log(line)
            if it == total:
                break
    return model

# -----------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = data.Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_args(p, required=True)
    count, rate = data.number(), data.number(float, 0.0)
    p.add_argument("--setting", choices=["multi", "single", "few-shot"], default="multi",
                   help="one model for all classes (default), one per class, or one on k shots per class")
    p.add_argument("--shots", type=count, help="few-shot: training images per class")
    p.add_argument("--backbone", choices=list(data.WIDTHS), help="the DINOv2-with-registers size to download when "
                                                            "--weights is not given (default base)")
    p.add_argument("--weights", help="DINOv2 weights (.safetensors or .pth; torch hub, Hugging Face or timm names)")
    p.add_argument("--inp-num", type=count, default=6, help="number of INPs")
    p.add_argument("--epochs", type=count, help="default 200 (demo: 6)")
    p.add_argument("--iters", type=count, help="total iterations; overrides --epochs")
    p.add_argument("--lr", type=rate, default=1e-3, help="peak learning rate; the cosine ends at lr/10")
    p.add_argument("--warmup", type=data.number(low=0), default=100, help="warm-up iterations (at most a tenth of the run)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="output folder (default runs/<data>-<setting>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--cache-features", nargs="?", const="fp32", choices=["fp32", "bf16"],
                   help="compute the frozen encoder's features once and keep them in memory, in fp32 (default) or "
                        "bf16 (half the memory: MVTec AD at ViT-B/392 is 26 GB in fp32)")
    p.add_argument("--log-every", type=count, help="log every N iterations (default: every epoch)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    args = p.parse_args(argv)

    demo = args.data == "demo"
    for k, v in dict(image_size=256 if demo else 448, crop_size=224 if demo else 392, batch_size=8 if demo else 16,
                     epochs=6 if demo else 200, classes="all").items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.workers = data.workers(args.workers, 2 if demo else 4)
    data.check_sizes(args.image_size, args.crop_size, 14)
    if (args.setting == "few-shot") != bool(args.shots):
        raise ValueError("--shots k goes with --setting few-shot, and --setting few-shot needs --shots k")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    args.out = args.out or Path("runs") / f"{args.data.replace(',', '+')}-{args.setting}"
    return args

def plan(args, log):
    """[(sets, output folder)]: one run, or one per class for --setting single; every file checked."""
    if args.data == "demo":
        log(f"demo data set in {data.make_demo(args.data_root or data.default_root('demo'))}")
    sets = data.resolve_sets(args.data, args.data_root, args.classes)
    for d, r, cs in sets:
        log(f"{d}: {len(cs)} classes from {r}: {', '.join(cs)}")
        for c in cs:  # quick pre-flight of every file, so a bad one fails now, not hours into the run
            data.check_samples(data.list_samples(d, r, c, "train") + data.list_samples(d, r, c, "test"))
    runs = [([(d, r, [c])], args.out / c) for d, r, cs in sets for c in cs] if args.setting == "single" else [(sets, args.out)]
    for _, out in runs:
        check_out(out, args)
    return runs

def check_out(out, args):
    """A run folder holding a run is never reused, unless --resume or --overwrite says so."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    found = [out / f for f in ("model.safetensors", "train_state.pt") if (out / f).is_file()]
    if found and not (args.resume or args.overwrite):
        done = found[0].name == "model.safetensors" and inpformer.read_checkpoint_metadata(found[0]).get("finished")
        raise ValueError(f"{found[0]}: --out already holds a {'finished' if done else 'started'} run; pass --resume "
                         "to continue it, another --out, or --overwrite to replace it")

def main(argv=None, log=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = data.device(args.device, args.precision)  # fp16 needs CUDA
    if world > 1:  # torchrun: one process per device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log = log or ((lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None))
    asked = args.precision  # evaluation runs in fp32 unless a precision was asked for
    args.precision = ("bf16" if device.type == "cuda" else "fp32") if asked == "auto" else asked
    check_out(args.out, args)  # before anything is written
    runs = plan(args, log)
    encoder = data.load_encoder(args.weights, args.backbone, args.data == "demo", log)
    log(f"device {device}, precision {args.precision}" + (f", {world} processes" if world > 1 else ""))
    models = []
    for sets, out in runs:
        log(f"== class {sets[0][2][0]}" if len(runs) > 1 else f"training {out}")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        models.append(train(setup(args, encoder, sets, out, device, log, rank, world), log))
    if world > 1:
        dist.destroy_process_group()
    if rank == 0 and not args.no_eval:
        evaluate.main(["--ckpt", str(args.out), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                       "--device", str(device), "--precision", asked])
    return models

if __name__ == "__main__":
    data.guard(main)
