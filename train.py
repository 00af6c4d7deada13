"""Train INP-Former with the official recipe, on one device or under torchrun DDP.

    python train.py --data demo                                          # built-in demo data, no download
    python train.py --data mvtec --data-root /data/mvtec_anomaly_detection --classes all
    python train.py --data visa --data-root /data/VisA_pytorch/1cls --setting single
    python train.py --data mvtec --data-root /data/mvtec --setting few-shot --shots 4
    python train.py --data mvtec,visa,realiad --data-root /data/mvtec,/data/visa,/data/Real-IAD
    torchrun --nproc_per_node=4 train.py --data mvtec --data-root /data/mvtec
    python train.py --data mvtec --data-root /data/mvtec --out runs/x --resume     # continue a stopped run

The run folder gets train_state.pt (what --resume needs), model.safetensors (what evaluate.py reads) and
train.log; the run is then evaluated (unless --no-eval). The README's "Real use" says how saves, resume and
torchrun behave. What goes beyond the paper (whole frames, tiles, 16-bit images, the feature cache, bf16 on a
CPU, the download) is in line/, imported only in the branch that needs it.
"""
import argparse
import contextlib
import copy
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
import demo  # the built-in demo data set, its small random ViT and its recipe (demo.py)
import inpformer

# The official multi-class recipe's geometry (448 -> 392), batch and length; --data demo has its own (demo.RECIPE).
RECIPE = dict(geometry=data.ResizeCrop(), batch_size=16, epochs=200, workers=4)
# The DINOv2-with-registers size taken when --weights is not given: Hugging Face's
# facebook/dinov2-with-registers-<size>, downloaded once by line/weights.py.
DEFAULT_BACKBONE = "base"
BACKBONE_WIDTHS = {"small": 384, "base": 768, "large": 1024}  # the sizes --backbone names
METADATA_VERSION = 2  # of what a checkpoint records; 1: files written before it had a number

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
        # Multi-tensor (torch._foreach_*) form: 15 calls a step for all tensors on CUDA (where the multiply by each
        # tensor's own 0-dim scale still launches one small kernel per tensor), where a loop makes ~15 per tensor.
        for group in self.param_groups:
            for params in cpu_chunks([p for p in group["params"] if p.grad is not None]):
                self.update(group, params)

    def update(self, group, params):
        """One step of the tensors `params` of `group`, every one with a gradient."""
        beta1, beta2 = group["betas"]
        lr, grads = group["lr"], [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        steps = [state["step"] for state in states]
        exp_avg = [state["exp_avg"] for state in states]
        v = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        if group["amsgrad"]:
            v_max = [state["max_exp_avg_sq"] for state in states]
            torch._foreach_maximum_(v_max, v)
            v = v_max
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denom, group["eps"])
        # Each tensor's update is divided by max(1, RMS(g / denom) / clip_threshold).
        scale = torch._foreach_norm(torch._foreach_div(grads, denom))
        torch._foreach_div_(scale, [math.sqrt(g.numel()) * group["clip_threshold"] for g in grads])
        torch._foreach_clamp_min_(scale, 1.0)
        torch._foreach_mul_(denom, scale)
        torch._foreach_addcdiv_(params, exp_avg, denom, [-lr / (1 - beta1**t) for t in steps])


CPU_CHUNK_BYTES = 32 * 2**20  # see cpu_chunks


def cpu_chunks(params) -> list:
    """The tensors StableAdamW updates together: all of them, or on a CPU groups of about CPU_CHUNK_BYTES. All at
    once, a CPU step's temporaries (twice the weights' bytes) are fresh pages every step: 10 % slower training."""
    if not params or params[0].device.type != "cpu":
        return [params] if params else []
    chunks, size = [[]], 0
    for p in params:
        if size >= CPU_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += p.numel() * p.element_size()
    return chunks


def optimizer_step(loss, opt, scaler, params, max_norm=0.1):
    """Backward, then the official global gradient-norm clipping (on unscaled fp16 gradients), then a step. The
    official recipe clips twice: this norm of all gradients, then StableAdamW's clipping of each tensor's update.
    Returns the gradient norm before clipping, a tensor on the device (reading it would wait for the step)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
    scaler.step(opt)
    scaler.update()
    return norm


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
        used = len(self) * self.batch_size * self.world  # the tail that makes no full batch on every rank is dropped
        idx = torch.randperm(self.n, generator=g)[:used][self.rank::self.world]
        for b in range(self.skip, len(self)):
            yield idx[b * self.batch_size:(b + 1) * self.batch_size].tolist()

# -----------------------------------------------------------------------------------------------------
# The encoder


def load_encoder(weights=None, backbone=None, is_demo=False, log=print) -> inpformer.ViT:
    """The frozen encoder: --weights, else the demo's random ViT, else the DINOv2-with-registers file of
    --backbone (downloaded once by line.weights). Logs what it found."""
    if weights:
        try:
            vit = inpformer.load_backbone(weights)
        except inpformer.TimmNames:
            from line.weights import load_backbone

            vit = load_backbone(weights)
        if backbone and BACKBONE_WIDTHS[backbone] != vit.config.embed_dim:
            raise ValueError(f"--backbone {backbone} contradicts --weights {weights} (a {vit.config.embed_dim}"
                             "-wide ViT): drop --backbone, it only picks the file to download")
    elif is_demo:
        log("no --weights: using a small randomly initialised ViT (pass --weights for real DINOv2 features)")
        vit = demo.backbone()
    else:
        from line.weights import download_backbone

        vit = inpformer.load_backbone(download_backbone(backbone or DEFAULT_BACKBONE, log))
    c = vit.config
    log(f"backbone: ViT {c.embed_dim} wide, {c.depth} blocks, {c.num_heads} heads, {c.num_register_tokens} "
        f"registers, patch {c.patch_size}, from {getattr(vit, 'source', 'code')} weights")
    return vit


def fingerprint(encoder) -> str:
    """A short digest of the encoder's weights: two runs on the same backbone file share it, others do not."""
    with torch.no_grad():
        values = [float(p.double().abs().sum()) for p in encoder.parameters()]
    return f"{len(values)}:{sum(values):.10e}"


@contextlib.contextmanager
def tf32(on=True):
    """--tf32: CUDA's matrix products in TF32 inside the block (torch's default, which the official code keeps,
    runs them in fp32 and only convolutions in TF32); the settings are restored after it, so that the evaluation
    after training runs as the official code's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if on:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def step_encoder(model, device, amp_dtype):
    """The encoder the training steps run: the model's own, or under bf16/fp16 autocast a copy cast once to that
    dtype. Autocast caches the casts of trainable weights only, so it would cast the frozen fp32 encoder again
    on every step; the copy lives as long as the run and is never saved (the checkpoint keeps the fp32 one)."""
    if amp_dtype is None:
        return model.encoder
    encoder = copy.deepcopy(model.encoder).to(device, amp_dtype)
    if device.type == "cpu":
        from line.cpu import use_cpu_attention  # bf16 attention as plain products, the CPU's bf16 units

        use_cpu_attention(encoder)
    return encoder


class LossModule(torch.nn.Module):
    """The training loss as a forward(), for DistributedDataParallel: model.loss of images (their features from
    `encoder`), or of cached features. compile: the trainable part (everything after the frozen encoder) runs
    through torch.compile."""

    def __init__(self, model, encoder, compile=False):
        super().__init__()
        self.model, self.encoder = model, encoder
        self.loss_from_features = torch.compile(model.loss_from_features) if compile else model.loss_from_features

    def forward(self, x=None, features=None):
        if features is None:
            en, fused = self.model.encode(x, self.encoder)
            features = (en, fused, self.model.token_grid(x))
        return self.loss_from_features(*features)


# -----------------------------------------------------------------------------------------------------
# One training run: its state, setup, then the loop


@dataclass
class TrainingRun:
    """One model in training: what setup() builds, the loop reads and updates, and a resume restores."""
    model: inpformer.INPFormer
    net: torch.nn.Module          # LossModule, wrapped in DistributedDataParallel under torchrun
    dataset: torch.utils.data.Dataset  # the training images as data.py reads them
    batches: EpochBatches         # this process's batches
    opt: StableAdamW
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    amp: torch.autocast           # the autocast context of every step (disabled in fp32)
    device: torch.device
    out: Path
    meta: dict                    # what the checkpoint records (see setup)
    identity: dict                # what makes a saved state this run's (see run_identity); checked on --resume
    total: int                    # iterations of the whole run
    warmup: int
    lr: float
    log_every: int                # iterations between log lines
    save_every: float             # seconds between saves; 0: at the end of every epoch
    workers: int
    rank: int = 0
    world: int = 1
    start: int = 0                # the iteration the loop starts at (after a resume)
    store: data.ImageStore = None  # the training images decoded once (None: few-shot's views, or cached features)
    features: object = None       # line.feature_cache.FeatureCache, or None: the encoder runs in every step
    loss_sum: torch.Tensor = None  # float64 on the device: the sum of this process's losses since the last log line
    loss_count: int = 0
    first_bad: torch.Tensor = None  # on the device: the first iteration whose loss was not finite (inf: none yet)


def run_identity(args, sets, encoder=None, total=None) -> dict:
    """What a saved training state must match to be resumed by this run: the data (not its folder, which may
    have moved), the classes, sizes, model size, batch and seed; with an encoder and the iteration count, also
    the backbone's weights and the schedule (plan() checks the first part before anything is loaded)."""
    identity = dict(data=[d for d, _, _ in sets], classes=[cs for _, _, cs in sets],
                    geometry=identity_geometry(args.geometry),
                    inp_num=args.inp_num, setting=args.setting, shots=args.shots, batch_size=args.batch_size,
                    seed=args.seed)
    if encoder is not None:
        identity["backbone"] = fingerprint(encoder)
    if total is not None:
        identity["total_iters"] = total
    return identity


def identity_geometry(geometry) -> dict:
    """A geometry as a run's identity records it: without image_score, how frames are scored, not trained."""
    recorded = geometry.to_dict()
    recorded.pop("image_score", None)
    return recorded


def save(run, it):
    """One save: the training state, then the whole model, each written atomically (a kill between the two
    leaves a state one save ahead of the model, which --resume handles)."""
    state = dict(model={k: v for k, v in run.model.state_dict().items() if not k.startswith("encoder.")},
                 opt=run.opt.state_dict(), scaler=run.scaler.state_dict(), rng=torch.get_rng_state(),
                 iteration=it, window=[float(run.loss_sum), run.loss_count], identity=run.identity)
    with inpformer.atomic_write(run.out / "train_state.pt") as tmp:
        torch.save(state, tmp)
    run.meta.update(iteration=it, finished=it == run.total)
    inpformer.save_checkpoint(run.model, run.out / "model.safetensors", run.meta)


def read_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable training state ({inpformer.first_line(e)})") from None


def check_identity(path, saved, wanted):
    """A saved state of another run is refused, naming the first setting of `wanted` that differs."""
    if "identity" not in saved:  # written before the identity was saved: only the schedule can be checked
        saved_total = saved.get("meta", {}).get("total_iters")
        if "total_iters" in wanted and saved_total != wanted["total_iters"]:
            raise ValueError(f"{path}: saved for {saved_total} iterations, this run has {wanted['total_iters']}; "
                             "resume with the same --epochs/--iters/--batch-size")
        return
    identity = dict(saved["identity"])
    if isinstance(identity.get("geometry"), dict):  # states written before the paper's geometry had two keys
        identity["geometry"] = identity_geometry(data.geometry_of(identity["geometry"]))
    for key, value in wanted.items():
        if identity.get(key) != value:
            shown = {"backbone": "the backbone's weights", "total_iters": "iterations"}.get(key, key)
            raise ValueError(f"{path}: saved by a run with other {shown} ({identity.get(key)!r}, this run "
                             f"has {value!r}); resume with the same settings, or start another --out")


def restore(path, run):
    """Put a saved state back into the run; returns the iteration to continue at."""
    state = read_state(path)
    check_identity(path, state, run.identity)
    try:
        missing, unexpected = run.model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise KeyError((unexpected or missing)[0])
        run.opt.load_state_dict(state["opt"])
        if "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
    except Exception as e:
        raise ValueError(f"{path}: not a training state of this model ({inpformer.first_line(e)}); use the same "
                         "--weights/--inp-num as the run it comes from, or another --out") from None
    torch.set_rng_state(state["rng"])
    run.loss_sum.fill_(state["window"][0])
    run.loss_count = state["window"][1]
    return state["iteration"]


def setup(args, encoder, sets, out, device, log, rank=0, world=1) -> TrainingRun:
    """Model, data, optimiser and schedule for one model (on a copy of `encoder`) trained on the union of
    `sets` [(data, root, classes)], restored from `out` with --resume."""
    torch.manual_seed(args.seed)
    geometry = args.geometry
    model = inpformer.INPFormer(copy.deepcopy(encoder), inp_num=args.inp_num, geometry=geometry.to_dict())
    model = model.to(device)
    parts = [data.train_set(d, r, cs, geometry, shots=args.shots, seed=args.seed, check=False)  # plan() checked
             for d, r, cs in sets]
    dataset = torch.utils.data.ConcatDataset(parts)
    per_process = args.batch_size // world
    batches = EpochBatches(len(dataset), per_process, args.seed, rank, world)
    if len(batches) == 0:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch of {args.batch_size}: "
                         "lower --batch-size")
    total = args.iters or args.epochs * len(batches)
    if args.weights:
        backbone = args.weights
    elif args.data == "demo":
        backbone = encoder.source  # the demo's random ViT
    else:
        backbone = f"dinov2-with-registers-{args.backbone or DEFAULT_BACKBONE}"
    # What the checkpoint records; evaluate.py and predict.py find the data, the classes and a calibration here.
    meta = dict(metadata_version=METADATA_VERSION,
                data=",".join(d for d, _, _ in sets),           # a comma list for super-multi-class
                data_root=",".join(str(r) for _, r, _ in sets),  # their folders, in the same order
                classes=[c for _, _, cs in sets for c in cs],
                classes_per_set=[cs for _, _, cs in sets],
                setting=args.setting, shots=args.shots, backbone=str(backbone), seed=args.seed, total_iters=total)
    amp_dtype = None if args.precision == "fp32" else PRECISIONS[args.precision]
    amp = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    encoder = step_encoder(model, device, amp_dtype)
    net = LossModule(model, encoder, compile=args.compile)
    run = TrainingRun(model=model, net=net, dataset=dataset, batches=batches,
                      opt=StableAdamW(model.trainable_parameters(), lr=args.lr, weight_decay=1e-4),
                      scaler=torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"), amp=amp,
                      device=device, out=out, meta=meta, identity=run_identity(args, sets, model.encoder, total),
                      total=total, warmup=min(args.warmup, total // 10),  # a short run still spends most at full lr
                      lr=args.lr, log_every=args.log_every or len(batches), save_every=args.save_every,
                      workers=args.workers, rank=rank, world=world,
                      loss_sum=torch.zeros((), dtype=torch.float64, device=device),
                      first_bad=torch.full((), math.inf, dtype=torch.float64, device=device))
    if args.resume:
        run.start = restore(out / "train_state.pt", run)
        log(f"resuming {out} at iteration {run.start}/{total}")
    if world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(net, None if device.index is None else [device.index])
    if args.cache_features:
        from line.feature_cache import feature_cache

        recipe = dict(run.identity, data_root=meta["data_root"], dtype=args.cache_features, images=len(dataset))
        run.features = feature_cache(run, encoder, recipe, per_process, log)
    elif not args.shots:  # few-shot's shots are read once already, and their views made from them
        run.store = data.image_store(dataset, out / "image_cache", args.workers, log, rank, world)
    return run


def train(run: TrainingRun, log):
    """The loop: one step per batch, a save on the schedule and at the end. Returns the checkpoint's path. No
    step waits for the device (but under fp16, where GradScaler reads whether the gradients were finite): the
    loss is summed there and read at log lines only (check_window), where a loss that was not finite stops the
    run; a save between log lines checks first (check_before_save)."""
    model, batches, total = run.model, run.batches, run.total
    ckpt, per_epoch, it, t0 = run.out / "model.safetensors", len(batches), run.start, time.time()
    last_save = time.monotonic()
    loader = training_loader(training_data(run), batches, run.workers, run.device)
    model.train()
    while it < total:
        batches.epoch, batches.skip = it // per_epoch, it % per_epoch
        for batch in loader:
            for g in run.opt.param_groups:
                g["lr"] = warm_cosine(it, total, run.lr, run.lr * 0.1, run.warmup)
            with run.amp:
                loss = run.net(**step_inputs(run, batch))
            add_loss(run, loss, it)
            grad_norm = optimizer_step(loss, run.opt, run.scaler, model.trainable_parameters())
            it += 1
            if run.save_every:
                due = time.monotonic() - last_save >= run.save_every
            else:
                due = it % per_epoch == 0
            save_now = run.rank == 0 and (due or it == total)  # rank 0's clock decides, alone
            line = None  # logged after the save
            if it % run.log_every == 0 or it == total:
                line = progress_line(run, it, t0, check_window(run, it, ckpt))
            elif save_now:
                check_before_save(run, grad_norm, it, ckpt)
            if save_now:  # with the loss window: a resume logs the same losses
                save(run, it)
                last_save = time.monotonic()
            if line:
                log(line)
            if it == total:
                break
    return ckpt


def training_loader(dataset, batches, workers, device) -> torch.utils.data.DataLoader:
    """The batches of `batches` from `dataset` (the feature cache, the image store, or few-shot's views), gathered
    in `workers` loader processes, a batch ahead. A store in memory is gathered in this process: a batch takes
    about a millisecond there, less than handing it over from a worker."""
    if isinstance(dataset, data.ImageStore) and dataset.folder is None:
        workers = 0
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       collate_fn=getattr(dataset, "collate", None),
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def training_data(run) -> torch.utils.data.Dataset:
    """What the steps of `run` read: its feature cache, else its image store, else (few-shot) its views."""
    if run.features is not None:
        return run.features
    return run.store if run.store is not None else run.dataset


def step_inputs(run, batch) -> dict:
    """The arguments of run.net for one batch from the loader, on the device."""
    if run.features is not None:
        return dict(features=run.features.on_device(batch, run.device))
    if run.store is not None:  # decoded once; normalised here, on the device
        return dict(x=data.normalise(batch.to(run.device, non_blocking=True)))
    return dict(x=batch["image"].to(run.device, non_blocking=True))  # few-shot: views of the normalised shots


def add_loss(run, loss, it):
    """Add a step's loss to the window on the device, noting the first iteration whose loss is not finite,
    without reading either."""
    value = loss.detach().double()
    run.loss_sum += value
    run.loss_count += 1
    # min(first_bad, it) where the loss is not finite; a Python number, not a tensor made of it (a copy to the device)
    run.first_bad = torch.where(torch.isfinite(value), run.first_bad, run.first_bad.clamp(max=it))


def check_window(run, it, ckpt) -> float:
    """At a log line (the same iterations on every process): the window's mean loss over the processes, then a
    new window. A loss that was not finite on any process stops every process with the same line."""
    loss_sum, first_bad = run.loss_sum.clone(), run.first_bad.clone()
    if run.world > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        loss_sum /= run.world
    loss_sum, first_bad = loss_sum.item(), first_bad.item()
    if math.isfinite(first_bad):
        raise stopped(run, f"loss became {loss_sum}", int(first_bad), it, ckpt)
    run.loss_sum.zero_()
    mean, run.loss_count = loss_sum / run.loss_count, 0
    return mean


def check_before_save(run, grad_norm, it, ckpt):
    """Rank 0 saves by its own clock, so it checks alone: its losses since the last log line, and the last
    gradient norm (the same on every process under DDP, where another process's bad loss shows). Under fp16 an
    infinite norm is GradScaler's skipped step, whose weights stay as they were. Under torchrun rank 0 then stops
    alone (torchrun stops the others), and the loss window it saves is its own: the first log line after resuming
    from such a save averages rank 0's losses for the steps before it."""
    first_bad = run.first_bad.item()
    if math.isfinite(first_bad):
        raise stopped(run, f"loss became {run.loss_sum.item()}", int(first_bad), it, ckpt)
    if not run.scaler.is_enabled() and not math.isfinite(grad_norm.item()):
        raise stopped(run, f"the gradient norm became {grad_norm.item()}", it - 1, it, ckpt)


def stopped(run, what, bad, it, ckpt) -> ValueError:
    """The error that stops a run: what went wrong at iteration `bad` (counted from 0), found by the check after
    `it` iterations, and what is kept (no save follows a failed check)."""
    kept = f"the last saved checkpoint {ckpt} is kept" if ckpt.is_file() else "no checkpoint was written"
    return ValueError(f"{what} at iteration {bad} (epoch {bad // len(run.batches) + 1}; found by the check after "
                      f"iteration {it - 1}); {kept}. Try --precision fp32 or a lower --lr")


def progress_line(run, it, t0, loss):
    per_epoch, total = len(run.batches), run.total
    elapsed, done = time.time() - t0, it - run.start
    images_per_s = done * run.batches.batch_size * run.world / elapsed
    eta = elapsed / done * (total - it)
    return (f"epoch {math.ceil(it / per_epoch)}/{math.ceil(total / per_epoch)} iter {it}/{total} loss "
            f"{loss:.4f} lr {run.opt.param_groups[0]['lr']:.2e} {images_per_s:.1f} img/s ETA {format_time(eta)}")

# -----------------------------------------------------------------------------------------------------
# The log


class RunLog:
    """Log lines: to the screen, and once the run has passed its checks, also to <out>/train.log (appended across
    resumes; the lines logged before it opened are written first). Only the first torchrun process logs."""

    def __init__(self, echo=None, rank=0):
        self.echo = (echo or log_line) if rank == 0 else quiet
        self.rank, self.file, self.pending = rank, None, []

    def __call__(self, message):
        self.echo(message)
        if self.rank:
            return
        if self.file is None:
            self.pending.append(message)
        else:
            print(message, file=self.file, flush=True)

    def open(self, path):
        if self.rank:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")
        for message in self.pending:
            print(message, file=self.file)
        self.file.flush()
        self.pending = []

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def quiet(message):
    """The log of every torchrun process but the first: one process speaks for the run."""

# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    r = demo.RECIPE
    p = script_parser(__doc__)
    paper, small = RECIPE["geometry"], r["geometry"]
    add_data_args(p, data.DATASETS, required=True, defaults={
        "data": "none, required", "classes": "all", "image-score": "tiles with --tile, recorded in the checkpoint",
        "image-size": f"{paper.image_size[0]}; --data demo {small.image_size[0]}",
        "crop-size": f"{paper.crop_size[0]}; --data demo {small.crop_size[0]}; none with --tile",
        "tile": "none", "tile-overlap": "0", "bit-depth": "see above",
        "batch-size": f"{RECIPE['batch_size']}; --data demo {r['batch_size']}; under torchrun the global batch, "
                      "split evenly",
        "workers": f"up to {RECIPE['workers']} (--data demo {r['workers']}), at most the CPUs"})
    count, rate = number(), number(float, 0.0)
    p.add_argument("--setting", choices=["multi", "single", "few-shot"], default="multi",
                   help="one model for all classes (default), one per class, or one on k shots per class")
    p.add_argument("--shots", type=count, help="few-shot: training images per class")
    p.add_argument("--backbone", choices=list(BACKBONE_WIDTHS),
                   help=f"the DINOv2-with-registers size to download when --weights is not given (default "
                        f"{DEFAULT_BACKBONE})")
    p.add_argument("--weights", help="DINOv2 weights (.safetensors or .pth; torch hub, Hugging Face or timm names)")
    p.add_argument("--inp-num", type=count, default=6, help="number of INPs (default 6)")
    p.add_argument("--epochs", type=count, help=f"default {RECIPE['epochs']} (--data demo: {r['epochs']})")
    p.add_argument("--iters", type=count, help="total iterations; overrides --epochs")
    p.add_argument("--lr", type=rate, default=1e-3, help="peak learning rate (default 1e-3); the cosine ends at lr/10")
    p.add_argument("--warmup", type=number(low=0), default=100,
                   help="warm-up iterations (default 100, at most a tenth of the run)")
    p.add_argument("--seed", type=int, default=1, help="seed of the initialisation and the data order (default 1)")
    p.add_argument("--out", type=Path, help="output folder (default runs/<data>-<setting>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its training state")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--save-every", type=number(float, -1.0), default=600.0, metavar="SECONDS",
                   help="seconds between saves of the training state and model (default 600; 0: every epoch); a "
                        "run also saves when it ends")
    p.add_argument("--cache-features", nargs="?", const="fp32", choices=["fp32", "bf16"],
                   help="compute the frozen encoder's features once, into memory-mapped files in <out>/feature_cache "
                        "shared by every process, in fp32 (default) or bf16 (half the size: MVTec AD at ViT-B/392 is "
                        "26 GB in fp32)")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep <out>/feature_cache and <out>/image_cache (the training images decoded once, when they "
                        "do not fit in memory) after the run")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA only: matrix products in TF32 (faster; their inputs rounded to 10 mantissa bits, where "
                        "the official code keeps fp32's 23; convolutions use TF32 either way, torch's default)")
    p.add_argument("--compile", action="store_true", help="run the trainable part through torch.compile")
    p.add_argument("--log-every", type=count, help="log every N iterations (default: every epoch)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    args = p.parse_args(argv)

    recipe = demo.RECIPE if args.data == "demo" else RECIPE
    for name in ("batch_size", "epochs"):
        if getattr(args, name) is None:
            setattr(args, name, recipe[name])
    args.classes = args.classes or "all"
    args.workers = workers(args.workers, recipe["workers"])
    args.precision = device_and_precision(args)[1]
    if args.tile not in (None, "none") and args.image_score is None:
        args.image_score = "tiles"  # a model trained on tiles records the tile-by-tile image score
    args.geometry = geometry(args, recipe["geometry"]).check()
    if (args.setting == "few-shot") != bool(args.shots):
        raise ValueError("--shots k goes with --setting few-shot, and --setting few-shot needs --shots k")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if args.tf32 and device_and_precision(args)[0].type != "cuda":
        raise ValueError("--tf32 runs on CUDA only (drop it on a CPU)")
    args.out = args.out or Path("runs") / f"{args.data.replace(',', '+')}-{args.setting}"
    return args


@dataclass
class Plan:
    """One model to train: on which data, into which folder, and whether --resume finds it finished."""
    sets: list        # [(data set, root, [classes])]
    out: Path
    finished: bool = False


def plan(args, log) -> list[Plan]:
    """One model, or one per class for --setting single; every file checked, every run folder checked."""
    if args.data == "demo":
        log(f"demo data set in {demo.make_demo(args.data_root or data.default_root('demo'))}")
    sets = data.resolve_sets(args.data, args.data_root, args.classes)
    for d, r, cs in sets:
        log(f"{d}: {len(cs)} classes from {r}: {', '.join(cs)}")
        for c in cs:  # quick pre-flight of every file, so a bad one fails now, not hours into the run
            data.check_samples(data.list_samples(d, r, c, "train") + data.list_samples(d, r, c, "test"))
    if args.setting == "single":
        plans = [Plan([(d, r, [c])], args.out / c) for d, r, cs in sets for c in cs]
    else:
        plans = [Plan(sets, args.out)]
    for p in plans:
        p.finished = check_out(p.out, args, run_identity(args, p.sets), single=len(plans) > 1)
    if args.resume and len(plans) > 1 and not any((p.out / "train_state.pt").is_file() for p in plans):
        raise ValueError(f"--resume: no class of {args.out} has a training state (train_state.pt): nothing to resume")
    return plans


def check_out(out, args, identity=None, single=False) -> bool:
    """Whether the run folder may be used as asked; returns True when --resume finds the run in it finished. A
    folder holding a run is never reused unless --resume or --overwrite says so, and --resume needs a training
    state of the same run (`identity`; a class of a single-class run not reached yet may have none)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    state, model = out / "train_state.pt", out / "model.safetensors"
    if args.overwrite:
        return False
    if args.resume:
        if state.is_file():
            saved = read_state(state)
            check_identity(state, saved, identity or {})
            return saved["iteration"] >= saved.get("identity", saved.get("meta", {})).get("total_iters", math.inf)
        if model.is_file():
            raise ValueError(f"{out}: --resume needs {state.name}, and there is only {model.name} (the state was "
                             "deleted or never copied); nothing was changed. Train again with another --out")
        if not single:
            raise ValueError(f"{out}: no training state ({state.name}) to resume")
        return False
    found = [f for f in (model, state) if f.is_file()]
    if found:
        done = found[0] == model and inpformer.read_checkpoint_metadata(model).get("finished")
        raise ValueError(f"{found[0]}: --out already holds a {'finished' if done else 'started'} run; pass --resume "
                         "to continue it, another --out, or --overwrite to replace it")
    return False


def main(argv=None, log=None):
    """Train as the command line says; returns the checkpoint paths written (one per class for --setting single)."""
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is the global batch: it must divide evenly among the "
                         f"{world} processes")
    device = resolve_device(args.device)
    log = RunLog(log, rank)
    plans = plan(args, log)  # checks everything before anything is written
    if all(p.finished for p in plans):
        log(f"{args.out}: the run is finished; nothing to do (evaluate it with evaluate.py --ckpt {args.out})")
        return []
    if world > 1:  # torchrun: one process per device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        encoder = load_encoder(args.weights, args.backbone, args.data == "demo", log)
        log.open(args.out / "train.log")  # every check passed: from here on the run writes
        batch = f"batch {args.batch_size}"
        if world > 1:
            batch = f"{world} processes x {args.batch_size // world} images = global batch {args.batch_size}"
        log(f"device {device}, precision {args.precision}, {batch}; images: {args.geometry.describe()}")
        speed = [flag for flag, on in (("--tf32", args.tf32), ("--compile", args.compile)) if on]
        if speed:
            log(f"speed flags: {', '.join(speed)}")
        checkpoints = []
        with tf32(args.tf32):  # training only: the evaluation below runs as the official code's
            for p in plans:
                label = f"== class {p.sets[0][2][0]}" if len(plans) > 1 else f"training {p.out}"
                if p.finished:
                    log(f"{label}: finished, kept as it is")
                    checkpoints.append(p.out / "model.safetensors")
                    continue
                log(label)
                if rank == 0:
                    p.out.mkdir(parents=True, exist_ok=True)
                resume = args.resume and (p.out / "train_state.pt").is_file()
                run = setup(_with(args, resume=resume), encoder, p.sets, p.out, device, log, rank, world)
                checkpoints.append(train(run, log))
                for cache in (run.features, run.store):
                    if cache is not None and cache.folder is not None and not args.keep_cache and rank == 0:
                        shutil.rmtree(cache.folder, ignore_errors=True)
                del run  # the model, its optimizer and casts go before the next class's
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if rank == 0 and not args.no_eval:
            import evaluate  # it imports this file's command line

            evaluate.main(["--ckpt", str(args.out), "--batch-size", str(args.batch_size), "--workers",
                           str(args.workers), "--device", str(device), "--precision", args.precision], log=log)
        return checkpoints
    finally:
        log.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _with(args, **changes):
    """A copy of the parsed arguments with some changed."""
    out = copy.copy(args)
    vars(out).update(changes)
    return out


# -----------------------------------------------------------------------------------------------------
# The command line every script shares (evaluate.py, predict.py, data.py and demo.py import it from here):
# argument types that name the flag and the value they refuse, the data and device options, the device and
# precision rule, the log line, and guard(). Library code raises plain exceptions (ValueError, data.DataError,
# inpformer.WeightsError, OSError) with one-line messages; `if __name__ == "__main__": guard(main)` prints them.

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # see resolve_precision


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises ValueError (one line, exit 2 through guard) instead of printing
    the usage text and exiting by itself."""

    def error(self, message):
        raise ValueError(f"{message} (see --help)")


def script_parser(doc) -> Parser:
    """The parser of a script whose docstring opens with a one-paragraph summary followed by its examples: --help
    shows the summary first and the examples last."""
    summary, examples = doc.split("\n\n")[:2]
    return Parser(description=summary, epilog="examples:\n" + examples,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def number(kind=int, low=1):
    """An argparse type: a whole number of at least `low`, or (kind=float) a finite number above `low`."""
    def parse(text):
        with contextlib.suppress(ValueError):
            value = kind(text)
            if kind is int and value >= low:
                return value
            if kind is float and math.isfinite(value) and value > low:
                return value
        wanted = f"a whole number of at least {low}" if kind is int else f"a number above {low}"
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
    return parse


def size(word):
    """An argparse type for sizes: "N" (N x N), "HxW" (H rows high, W wide), or the one `word` (none, native)."""
    def parse(text):
        if text.strip().lower() == word:
            return word
        with contextlib.suppress(ValueError):
            parts = [int(p) for p in text.lower().split("x")]
            if len(parts) in (1, 2) and all(p >= 1 for p in parts):
                return (parts[0], parts[-1])
        raise argparse.ArgumentTypeError(f"{text!r} is not N, HxW (e.g. 350x140: 350 rows high, 140 wide) or {word}")
    return parse


def tile_size(text):
    """An argparse type: a whole number of at least 1, or none."""
    if text.strip().lower() == "none":
        return "none"
    return number()(text)


def fraction(text):
    """An argparse type: a number from 0 up to (not including) 1."""
    with contextlib.suppress(ValueError):
        value = float(text)
        if 0.0 <= value < 1.0:
            return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 up to 1 (1 excluded)")


def names_of(known):
    """An argparse type: a comma list of names, each one of `known` (e.g. data.DATASETS)."""
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            shown = ", ".join(map(repr, unknown)) or repr(text)
            raise argparse.ArgumentTypeError(f"unknown data set {shown} (known: {', '.join(known)})")
        return ",".join(names)
    return parse


def add_data_args(parser, datasets, required=False, defaults=None):
    """The data, size and device options of the scripts; `datasets` are the data set names --data knows. Their
    defaults are None here: each script fills them in (train.py from the recipe, evaluate.py and predict.py from
    the checkpoint) and says so in `defaults`, {option: its --help text}; unnamed options read "default: the
    checkpoint's"."""
    defaults = {"workers": "up to 4, at most the CPUs",
                "image-score": "the checkpoint's, or predict.py the calibration's; stitched for a model trained "
                               "without tiles or before the rule was recorded",
                **(defaults or {})}

    def default(option):
        text = defaults.get(option, "the checkpoint's")
        return f"(default: {text})"

    g = parser.add_argument_group("data and device")
    g.add_argument("--data", type=names_of(datasets), required=required,
                   help=f"data set: {', '.join(datasets)}, or a comma list of them {default('data')}")
    g.add_argument("--data-root", help="folder holding the data set (a comma list, one per --data; demo: demo_data/)")
    g.add_argument("--classes", help=defaults.get("classes help", f'"all" or a comma list of class names '
                                                                   f'{default("classes")}'))
    g.add_argument("--image-size", type=size("native"), metavar="N|HxW|native",
                   help="the resize of every frame: N x N, or H rows x W columns (frames of other shapes are stretched "
                        "to it); native: each frame's own size, with --tile " + default("image-size"))
    g.add_argument("--crop-size", type=size("none"), metavar="N|HxW|none",
                   help="the centre crop of the resized frame fed to the model, a multiple of the patch size 14 (the "
                        "paper's protocol); none: the whole frame " + default("crop-size"))
    g.add_argument("--tile", type=tile_size, metavar="N|none",
                   help="cover each resized frame with N x N tiles (a multiple of 14; --crop-size none is implied), "
                        "each scored on its own, their maps averaged where they overlap; none: no tiles "
                        + default("tile"))
    g.add_argument("--tile-overlap", type=fraction, metavar="F",
                   help="the fraction of a tile neighbouring tiles share, 0 <= F < 1 " + default("tile-overlap"))
    g.add_argument("--image-score", choices=["tiles", "stitched"],
                   help="the image score of a tiled frame: tiles, the highest of its tiles' own scores; stitched, the "
                        "stitched map's " + default("image-score"))
    g.add_argument("--bit-depth", type=number(), metavar="N",
                   help="significant bits of 16-bit and float grey images (e.g. 12); their values are divided by "
                        "2^N - 1 (default: 16 for integer images; float images must lie in [0, 1]) "
                        + default("bit-depth"))
    g.add_argument("--batch-size", type=number(), help=f"images per batch {default('batch-size')}")
    g.add_argument("--workers", type=number(low=0), help=f"data-loading processes {default('workers')}")
    g.add_argument("--device", default="auto", help='"auto" (default: cuda if available, else cpu), "cpu", "cuda", '
                                                    '"cuda:1"')
    g.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="the model's dtype (auto: fp32, the official recipe; bf16 is opt-in, also on CPUs with bf16 "
                        "units; fp16 on CUDA only). Maps, scores and losses stay fp32.")


def geometry(args, base) -> data.ResizeCrop:
    """`base` (the recipe's or the checkpoint's geometry) with the sizes the command line gives; --tile without
    --crop-size means the whole frame. Not yet checked against a patch size."""
    changes = {}
    if args.image_size is not None:
        changes["image_size"] = None if args.image_size == "native" else args.image_size
    if args.crop_size is not None:
        changes["crop_size"] = None if args.crop_size == "none" else args.crop_size
    if args.tile == "none":
        changes["tile"] = None
    elif args.tile is not None:
        changes["tile"] = args.tile
        changes.setdefault("crop_size", None)
    if args.tile_overlap is not None:
        changes["tile_overlap"] = args.tile_overlap
    if args.bit_depth is not None:
        changes["bit_depth"] = args.bit_depth
    if args.image_score is not None:
        changes["image_score"] = args.image_score
    geometry = data.geometry_of({**base.to_dict(), **changes})
    if args.tile_overlap is not None and geometry.tile is None:
        raise ValueError(f"--tile-overlap {args.tile_overlap}: the overlap of tiles, with --tile N")
    if args.image_score is not None and geometry.tile is None:
        raise ValueError(f"--image-score {args.image_score}: how a tiled frame is scored, with --tile N")
    return geometry


def add_picture_args(parser):
    """--heat-range and --outline: how evaluate.py's and predict.py's pictures are coloured (line/pictures.py)."""
    parser.add_argument("--heat-range", nargs=2, type=float, metavar=("LO", "HI"),
                        help="colour heat maps on this range (default: the calibration's; without one, min..max over "
                             "the images drawn)")
    parser.add_argument("--outline", action="store_true",
                        help="draw the edge of the region above the calibrated pixel threshold on pictures")


def check_picture_args(args):
    if args.heat_range and not args.heat_range[0] < args.heat_range[1]:
        raise ValueError(f"--heat-range {' '.join(map(str, args.heat_range))}: LO must be below HI")


def log_line(message):
    """A log line on stdout, at once (a pipe would otherwise hold it back until the run ends)."""
    print(message, flush=True)


def resolve_precision(precision, device) -> str:
    """"auto" is fp32, as the official code trains and evaluates; bf16 and fp16 are opt-in. fp16 needs CUDA
    (CPUs have no fast fp16 matrix products; bf16 runs on CPUs with bf16 units such as AVX512-BF16 or AMX)."""
    name = "fp32" if precision in (None, "auto") else precision
    if name not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use auto, {', '.join(PRECISIONS)}")
    if name == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("--precision fp16 runs on CUDA only (use bf16 on a CPU)")
    return name


def resolve_device(name) -> torch.device:
    """"auto" (or None): the first CUDA device when there is one, else the CPU; anything else must name a device
    that is here."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"--device {name}: no CUDA device is available here (use --device cpu)")
        if (dev.index or 0) >= count:
            raise ValueError(f"--device {name}: only {count} CUDA device(s) here")
    return dev


def device_and_precision(args) -> tuple[torch.device, str]:
    """The device --device names and the precision --precision resolves to there (resolve_precision)."""
    dev = resolve_device(args.device)
    return dev, resolve_precision(args.precision, dev)


def workers(asked=None, default=4) -> int:
    """Loader processes: as asked, else up to `default`; never more than the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(default if asked is None else asked, cpus)


def format_time(seconds) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def one_line(exc: BaseException) -> str:
    """The one-line message of `exc`, also when a DataLoader worker re-raised it with the worker's whole
    traceback as the message: the original message is its last line, after the exception's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if len(lines) == 1:
        return lines[0]
    return re.sub(r"^(?:[\w.]+\.)?DataError: ", "", lines[-1])


def guard(main) -> None:
    """Run main(); bad input (a ValueError such as data.DataError or inpformer.WeightsError, or an OSError) ends
    with one line "error: ..." on stderr and exit status 2. INPFORMER_TRACEBACK=1 shows the traceback instead."""
    try:
        rc = main()
        sys.exit(rc if isinstance(rc, int) else 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        if os.environ.get("INPFORMER_TRACEBACK"):
            raise
        if isinstance(e, torch.cuda.OutOfMemoryError):
            message = "out of GPU memory; lower --batch-size"
        else:
            message = one_line(e)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    guard(main)
