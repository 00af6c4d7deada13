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
cosine to lr/10, gradient-norm clipping 0.1, 200 epochs, seed 1. On CUDA the model runs in bf16 autocast
(fp16 with a gradient scaler on request); on the CPU in fp32.

Under torchrun each process loads --batch-size images per step (the paper's recipe is 16 in all, on one GPU),
the data is sharded with one seeded permutation per epoch, and only rank 0 writes files.

Every epoch (and at the end) `<out>/model.safetensors` (the model, config in its metadata, what
`evaluate.py --ckpt` reads) and `<out>/train_state.safetensors` (optimizer, schedule position, RNG) are
written atomically; `--resume` continues from them and ends with the same weights as an uninterrupted run.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

import data
import inpformer
from evaluate import (CliError, Parser, add_data_args, autocast, combine, evaluate, format_time, guard,
                      markdown_table, pick_device, write_results)

HF_WEIGHTS = "https://huggingface.co/facebook/dinov2-with-registers-{size}/resolve/main/model.safetensors"

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
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                v = state["exp_avg_sq"]
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


# -----------------------------------------------------------------------------------------------------
# Data order: one seeded permutation per epoch, sharded over ranks, so a resumed run replays it exactly


class EpochBatches(torch.utils.data.Sampler):
    """Batches of one epoch: permutation seeded by (seed, epoch), every world-th index from `rank`, no
    partial batch; the first `skip` batches are left out when resuming mid-epoch."""

    def __init__(self, n, batch_size, seed, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.skip = 0, 0

    def __len__(self):
        return self.n // self.world // self.batch_size

    def indices(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: len(self) * self.batch_size * self.world]
        return perm[self.rank :: self.world].tolist()

    def __iter__(self):
        idx = self.indices()
        for b in range(self.skip, len(self)):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size]


class CachedFeatures:
    """Encoder outputs of every training image, computed once: the encoder is frozen and the training images
    are not augmented on the fly, so they never change. Trades memory for skipping the encoder each epoch."""

    def __init__(self, model, dataset, batch_size, device, amp, workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        en, fused = [], []
        for batch in loader:
            x = batch["image"].to(device)
            with amp:
                e, f = model.encode(x)
            en.append(torch.stack(e, 1).cpu())
            fused.append(f.cpu())
        self.en, self.fused = torch.cat(en), torch.cat(fused)
        self.grid = model.token_grid(x)

    def batch(self, idx, device):
        en = self.en[idx].to(device)
        return list(en.unbind(1)), self.fused[idx].to(device)


class LossModule(torch.nn.Module):
    """model.loss as a forward(), so that DistributedDataParallel can wrap it and average the gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x=None, features=None, grid=None):
        if features is not None:
            return self.model.loss_from_features(*features, grid)
        return self.model.loss(x)


# -----------------------------------------------------------------------------------------------------
# Backbone weights


def default_weights(backbone, log):
    """The Hugging Face DINOv2-with-registers file for `backbone`, from the cache or downloaded there once."""
    cache = Path(os.environ.get("INPFORMER_CACHE", Path.home() / ".cache" / "inpformer"))
    path = cache / f"dinov2-with-registers-{backbone}.safetensors"
    if path.is_file():
        return path
    url = HF_WEIGHTS.format(size=backbone)
    log(f"downloading {url} to {path}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total, done, shown = int(r.headers.get("Content-Length") or 0), 0, -1
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if total and (pct := 100 * done // total) // 10 != shown:
                    shown = pct // 10
                    log(f"  {done >> 20} / {total >> 20} MiB ({pct}%)")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CliError(f"could not download the DINOv2 weights ({getattr(e, 'reason', e)}): download {url} and "
                       f"save it as {path}, or pass --weights PATH") from None
    return path


def demo_backbone():
    """A small randomly initialised ViT, so the demo runs with nothing downloaded. Random features still
    separate the demo's defects from its textures, though far less well than DINOv2's."""
    g = torch.Generator().manual_seed(0)  # the same backbone every run, whatever --seed
    vit = inpformer.ViT(inpformer.ViTConfig(embed_dim=128, depth=10, num_heads=2, num_register_tokens=0))
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):  # small layer scale: blocks refine the patch features, not scramble them
                p.fill_(0.1)
            elif p.ndim > 1 or name in ("cls_token", "pos_embed"):
                torch.nn.init.trunc_normal_(p, std=0.02, generator=g)
            elif name.endswith("bias"):
                p.zero_()
    torch.nn.init.kaiming_uniform_(vit.patch_embed.proj.weight, a=math.sqrt(5), generator=g)  # conv's default
    return vit


# -----------------------------------------------------------------------------------------------------
# Checkpoints


def save_state(path, model, opt, it, epoch, meta):
    """Everything --resume needs (trainable weights, optimizer, RNG, position), as one atomic file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if not k.startswith("encoder.")}
    sd = opt.state_dict()
    steps = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                steps[f"{i}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    info = dict(meta, iteration=it, epoch=epoch, optim_scalars=steps,
                param_groups=[{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]])
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={"train_state": json.dumps(info)})
    os.replace(tmp, path)


def load_state(path, model, opt):
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CliError(f"{path}: not a readable training state ({inpformer._first_line(e)})") from None
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    bad = [k for k in own if k not in weights or weights[k].shape != own[k].shape]
    if bad or len(weights) != len(own):
        raise CliError(f"{path}: training state does not match this model ({bad[0] if bad else 'extra tensors'}); "
                       "use the same --backbone/--inp-num/--weights, or a new --out")
    model.load_state_dict(weights, strict=False)
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for k, v in info["optim_scalars"].items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = [dict(g, params=list(range(len(opt.param_groups[0]["params"])))) for g in info["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return info


# -----------------------------------------------------------------------------------------------------
# One training run


def train_one(args, sets, out, device, ddp, log):
    """Train one model on the union of `sets` ([(data, root, classes)]), writing checkpoints under `out`."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    torch.manual_seed(args.seed)
    encoder = load_encoder(args, log)
    model = inpformer.INPFormer(encoder, inp_num=args.inp_num).to(device)
    kinds = [d for d, _, _ in sets]
    meta = dict(data=",".join(kinds), data_root=",".join(str(r) for _, r, _ in sets),
                classes=[c for _, _, cs in sets for c in cs], classes_per_set=[cs for _, _, cs in sets],
                image_size=args.image_size, crop_size=args.crop_size, setting=args.setting,
                backbone=str(args.weights) if args.weights else "random-demo" if args.data == "demo" else args.backbone,
                shots=args.shots, seed=args.seed)

    parts = [data.train_set(d, r, cs, args.image_size, args.crop_size, shots=args.shots, seed=args.seed, check=False)
             for d, r, cs in sets]  # main() already checked every file
    dataset = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    batches = EpochBatches(len(dataset), args.batch_size, args.seed, rank, world)
    per_epoch = len(batches)
    if per_epoch == 0:
        raise CliError(f"the training set has {len(dataset)} images, fewer than one batch of "
                       f"{args.batch_size} x {world} process(es): lower --batch-size")
    total = args.iters or args.epochs * per_epoch
    warmup = min(args.warmup, total // 10)  # a short run still spends most of its time at full lr

    opt = StableAdamW(model.trainable_parameters(), lr=args.lr, weight_decay=1e-4)
    amp = autocast(device, args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    ckpt, state_path = out / "model.safetensors", out / "train_state.safetensors"
    start = 0
    if args.resume and state_path.is_file():
        info = load_state(state_path, model, opt)
        start = info["iteration"]
        log(f"resuming {out} at iteration {start}/{total}")
        if info.get("total_iters", total) != total:
            raise CliError(f"{state_path}: saved for {info['total_iters']} iterations, this run has {total}; "
                           "resume with the same --epochs/--iters/--batch-size")
    elif args.resume:
        log(f"--resume: nothing to resume in {out}, starting from scratch")
    meta["total_iters"] = total

    net = LossModule(model)
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    cache = None
    if args.cache_features and start < total:
        t0 = time.time()
        cache = CachedFeatures(model, dataset, args.batch_size, device, amp, args.workers)
        log(f"cached encoder features of {len(dataset)} images in {time.time() - t0:.0f}s "
            f"({(cache.en.nbytes + cache.fused.nbytes) / 2**30:.2f} GiB)")
        loader = None
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                             pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)

    seen = []
    it, t_log, n_log, loss_sum = start, time.time(), 0, 0.0
    t_start, it_start = time.time(), start
    model.train()
    while it < total:
        epoch = it // per_epoch
        batches.epoch, batches.skip = epoch, it % per_epoch
        # the loader consumes the same batch sampler, so zip pairs each batch with its indices
        for idx, batch in zip(batches, loader) if loader else ((idx, None) for idx in batches):
            if args.print_samples:
                seen.extend(idx)
            for g in opt.param_groups:
                g["lr"] = warm_cosine(it, total, args.lr, args.lr * 0.1, warmup)
            with amp:
                if cache:
                    loss = net(features=cache.batch(idx, device), grid=cache.grid)
                else:
                    loss = net(batch["image"].to(device, non_blocking=True))
            value = loss.item()
            if not math.isfinite(value):
                kept = f"the last good checkpoint {ckpt} is kept" if ckpt.is_file() else "no checkpoint was written"
                raise CliError(f"loss became {value} at iteration {it} (epoch {epoch}); {kept}. "
                               "Try --precision fp32 or a lower --lr")
            optimizer_step(loss, opt, scaler, model.trainable_parameters())
            it += 1
            loss_sum, n_log = loss_sum + value, n_log + 1
            end_of_epoch = it % per_epoch == 0 or it == total
            if (args.log_every and it % args.log_every == 0) or (not args.log_every and end_of_epoch):
                now = time.time()
                ips = n_log * args.batch_size * world / (now - t_log)
                eta = (now - t_start) / (it - it_start) * (total - it)
                log(f"epoch {epoch + 1}/{math.ceil(total / per_epoch)} iter {it}/{total} loss {loss_sum / n_log:.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {ips:.1f} img/s ETA {format_time(eta)}")
                t_log, n_log, loss_sum = now, 0, 0.0
            if rank == 0 and (end_of_epoch or it == args.stop_at):
                save_state(state_path, model, opt, it, epoch, meta)
                inpformer.save_checkpoint(model, ckpt, dict(meta, iteration=it, finished=it == total))
            if it == args.stop_at or it == total:
                break
        if it == args.stop_at and it < total:
            log(f"stopped at iteration {it} as asked (--stop-at); continue with --resume")
            break
    if args.print_samples:
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.trainable_parameters()))
        print(f"rank {rank} samples {json.dumps(sorted(seen))} weights {digest.hexdigest()}", flush=True)
    return model, it == total


def load_encoder(args, log):
    if args.weights:
        return inpformer.load_backbone(args.weights)
    if args.data == "demo":
        log("no --weights: using a small randomly initialised ViT (pass --weights for real DINOv2 features)")
        return demo_backbone()
    return inpformer.load_backbone(default_weights(args.backbone, log))


# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, required=True)
    p.add_argument("--setting", choices=["multi", "single", "few-shot"], default="multi",
                   help="one model for all classes (default), one per class, or one on k shots per class")
    p.add_argument("--shots", type=int, default=None, help="few-shot: training images per class")
    p.add_argument("--backbone", choices=["small", "base", "large"], default="base",
                   help="DINOv2-with-registers size used when --weights is not given")
    p.add_argument("--weights", help="DINOv2 weights (.safetensors or .pth; torch hub, Hugging Face or timm names)")
    p.add_argument("--inp-num", type=int, default=6, help="number of INPs")
    p.add_argument("--epochs", type=int, default=None, help="default 200 (demo: 8)")
    p.add_argument("--iters", type=int, default=None, help="total iterations; overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate; the cosine ends at lr/10")
    p.add_argument("--warmup", type=int, default=100, help="warm-up iterations (at most a tenth of the run)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<data>-<setting>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="CUDA autocast dtype (auto: bf16); the CPU always runs fp32")
    p.add_argument("--cache-features", action="store_true",
                   help="compute the frozen encoder's features once and keep them in memory (small data sets)")
    p.add_argument("--log-every", type=int, default=0, help="log every N iterations (default: every epoch)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)  # simulate an interruption
    p.add_argument("--print-samples", action="store_true", help=argparse.SUPPRESS)  # per-rank data check
    args = p.parse_args(argv)

    demo = args.data == "demo"
    defaults = dict(data_root=data.default_root(args.data), image_size=256 if demo else 448,
                    crop_size=224 if demo else 392, batch_size=8 if demo else 16, workers=2 if demo else 4,
                    epochs=8 if demo else 200, classes="all", device="auto")
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.data_root is None:
        raise CliError(f"--data {args.data} needs --data-root (the folder holding the data set)")
    if args.setting == "few-shot" and not args.shots:
        raise CliError("--setting few-shot needs --shots k")
    if args.setting != "few-shot":
        args.shots = None
    if args.crop_size % 14 or args.crop_size > args.image_size:
        raise CliError(f"--crop-size {args.crop_size} must be a multiple of 14 and at most --image-size")
    args.out = args.out or Path("runs") / f"{args.data.replace(',', '+')}-{args.setting}"
    return args


def main(argv=None):
    args = parse_args(argv)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        local = int(os.environ.get("LOCAL_RANK", 0))
        cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        device = pick_device(args.device)
    rank = dist.get_rank() if ddp else 0
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    if device.type != "cuda":
        args.precision = "fp32"
    elif args.precision == "auto":
        args.precision = "bf16"

    kinds = args.data.split(",")
    roots = str(args.data_root).split(",")
    if len(kinds) != len(roots):
        raise CliError(f"--data names {len(kinds)} data sets but --data-root gives {len(roots)} folders")
    sets = [(d, r, data.resolve_classes(d, r, args.classes if len(kinds) == 1 else "all")) for d, r in zip(kinds, roots)]
    for d, r, cs in sets:
        log(f"{d}: {len(cs)} classes from {r}: {', '.join(cs)}")
        for c in cs:  # quick pre-flight of every file, so a bad one fails now, not hours into the run
            for split in ("train", "test"):
                data.check_samples(data.list_samples(d, r, c, split))
    log(f"device {device}, precision {args.precision}" + (f", {dist.get_world_size()} processes" if ddp else ""))

    if args.setting == "single":
        runs = [([(d, r, [c])], args.out / c) for d, r, cs in sets for c in cs]
    else:
        runs = [(sets, args.out)]
    results = {}  # (data set, root) -> evaluation results of each model trained on it
    for run_sets, out in runs:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        if len(runs) > 1:
            log(f"== class {run_sets[0][2][0]}")
        model, finished = train_one(args, run_sets, out, device, ddp, log)
        if rank == 0 and finished and not args.no_eval:
            for i, (d, r, cs) in enumerate(run_sets):
                sub = "" if len(run_sets) == 1 else d if kinds.count(d) == 1 else f"{d}{i + 1}"
                results.setdefault((d, r), []).append(evaluate(
                    model.eval(), d, r, cs, args.image_size, args.crop_size, args.batch_size, device, args.workers,
                    out_dir=out / "eval" / sub, log=log))
    for (d, r), parts in results.items():  # one table per data set, every class in it
        table = combine(parts)
        if len(parts) > 1:
            write_results(table, args.out / "eval")
        if len(results) > 1:
            print(f"{d} ({r}):")
        print(markdown_table(table), flush=True)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    guard(main)
