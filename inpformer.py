"""INP-Former in one file: the model, its losses and anomaly maps, the evaluation protocol, DINOv2 weights and
INP-Former checkpoints. INPs are Intrinsic Normal Prototypes: a few tokens pooled from the test image itself, from
which the decoder rebuilds the image's features.

Luo et al., "Exploring Intrinsic Normal Prototypes within a Single Image for Universal Anomaly Detection",
CVPR 2025. Numerically faithful to the official code (luow23/INP-Former); parameter names match its state
dict, so the authors' `model.pth` loads as is.

    import inpformer
    model = inpformer.INPFormer(inpformer.load_backbone("dinov2_vitb14_reg4_pretrain.pth"))
    loss = model.loss(x)                      # x: (B, 3, 392, 392), ImageNet-normalised
    maps, scores = model.predict(x)           # (B, 256, 256) anomaly maps, (B,) image scores
    inpformer.save_checkpoint(model, "model.safetensors", {"data": "mvtec"})
    model = inpformer.load_model("model.safetensors")   # or the authors' model.pth
    model.config.geometry                     # how its images were prepared: {"image_size": [448, 448], ...}

Depends on torch, and on safetensors for files. It can be copied into another project on its own.
"""
import contextlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------
# The official evaluation protocol (utils.evaluation_batch(max_ratio=0.01, resize_mask=256))

MAP_SIZE = 256        # anomaly maps (and ground-truth masks) are resampled to 256 x 256 before scoring
GAUSSIAN_SIZE = 5     # then smoothed by a 5 x 5 Gaussian of sigma 4, zero padding
GAUSSIAN_SIGMA = 4.0
MAX_RATIO = 0.01      # image score: the mean of the top 1 % of the smoothed map's pixels

# The official preprocessing (dataset.py): a bilinear resize to 448 x 448, then the centre 392 x 392 crop. A
# model records how its training images were prepared as plain data like this (config.geometry).
PAPER_GEOMETRY = {"image_size": [448, 448], "crop_size": [392, 392]}

# -----------------------------------------------------------------------------------------------------
# DINOv2 ViT/14 (encoder)


@dataclass
class ViTConfig:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    num_register_tokens: int = 4
    patch_size: int = 14
    pos_grid: int = 37  # position embeddings are stored for a 37x37 grid (518 px / 14)
    mlp_ratio: float = 4.0


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def attention(q, k, v):
    """Softmax attention of (B, h, N, d) queries, keys and values, returned as (B, N, h * d), the heads side by
    side."""
    B, h, N, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, h * d)


def average(tensors):
    """The mean of same-shaped tensors, added one by one: the mean of a stack, without the stack's copy. Half
    precision is summed in fp32 and rounded once, as a stack's mean is."""
    dtype = tensors[0].dtype
    if dtype in (torch.bfloat16, torch.float16):
        return average([t.float() for t in tensors]).to(dtype)
    total = tensors[0] + tensors[1] if len(tensors) > 1 else tensors[0].clone()
    for t in tensors[2:]:
        total += t
    return total.div_(len(tensors))


class Block(nn.Module):
    attention = staticmethod(attention)  # a model may swap in its own (line/cpu.py does for bf16 on a CPU)

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        # Dicts, so that the parameters keep DINOv2's names (attn.qkv, attn.proj, ls1.gamma, ls2.gamma) and order.
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.ls1 = nn.ParameterDict(dict(gamma=nn.Parameter(torch.ones(dim))))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.ParameterDict(dict(gamma=nn.Parameter(torch.ones(dim))))

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = self.attention(q, k, v)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp(self.norm2(x))


class ViT(nn.Module):
    """DINOv2 vision transformer. Tokens are [CLS, registers, patches]; registers get no position embedding."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        D = c.embed_dim
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, D, kernel_size=c.patch_size, stride=c.patch_size)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.pos_grid**2, D))
        if c.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, c.num_register_tokens, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # unused; kept so every DINOv2 file loads strictly
        self.blocks = nn.ModuleList(Block(D, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def interpolate_pos_encoding(self, h, w):
        """Position embeddings for an (h, w) patch grid, exactly as the official INP-Former encoder does.

        It passes scale_factor (grid + 0.1) / 37 rather than size=grid: the 0.1 offset is a historical kludge
        of DINO (facebookresearch/dino#8), and scale_factor also sets the bicubic sampling coordinates, so
        size= (Hugging Face, timm) gives different features. Kept for checkpoint compatibility.
        """
        G, pos = self.config.pos_grid, self.pos_embed
        if h == w == G:
            return pos
        grid = pos[:, 1:].float().reshape(1, G, G, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / G, (w + 0.1) / G), mode="bicubic", antialias=False)
        assert grid.shape[-2:] == (h, w), grid.shape
        return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)), dim=1)

    def forward(self, x, layers=None):
        """Final-LayerNorm tokens [CLS, registers, patches], as DINOv2 outputs them; or with `layers`, the raw
        outputs (no final norm) of those blocks, patch tokens only: a list of (B, N, D)."""
        B, _, H, W = x.shape
        p, regs = self.config.patch_size, self.config.num_register_tokens
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        patches = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((self.cls_token.expand(B, -1, -1), patches), dim=1)
        t = t + self.interpolate_pos_encoding(H // p, W // p).to(t.dtype)
        if regs:
            t = torch.cat((t[:, :1], self.register_tokens.expand(B, -1, -1), t[:, 1:]), dim=1)
        if not layers:
            for blk in self.blocks:
                t = blk(t)
            return self.norm(t)
        out = []
        for i, blk in enumerate(self.blocks[: max(layers) + 1]):  # the blocks after the last one asked are skipped
            t = blk(t)
            if i in layers:
                out.append(t[:, 1 + regs:])
        return out


def vit_small(num_register_tokens=4):
    return ViT(ViTConfig(embed_dim=384, depth=12, num_heads=6, num_register_tokens=num_register_tokens))


def vit_base(num_register_tokens=4):
    return ViT(ViTConfig(embed_dim=768, depth=12, num_heads=12, num_register_tokens=num_register_tokens))


def vit_large(num_register_tokens=4):
    return ViT(ViTConfig(embed_dim=1024, depth=24, num_heads=16, num_register_tokens=num_register_tokens))

# -----------------------------------------------------------------------------------------------------
# INP Extractor and INP-Guided Decoder (LayerNorm eps 1e-8 in both, as in the official heads)


class INPExtractorBlock(nn.Module):
    """The learnable INP queries attend (softmax) to the image tokens."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = nn.ModuleDict(dict(q=nn.Linear(dim, dim), kv=nn.Linear(dim, 2 * dim), proj=nn.Linear(dim, dim)))
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, queries, tokens):
        B, M, C = queries.shape
        h = self.num_heads
        q = self.attn.q(self.norm1(queries)).view(B, M, h, C // h).transpose(1, 2)
        # One LayerNorm (norm1) serves the queries and the tokens, as in the official block.
        k, v = self.attn.kv(self.norm1(tokens)).view(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, M, C)
        queries = queries + self.attn.proj(x)
        return queries + self.mlp(self.norm2(queries))


class DecoderAttention(nn.Module):
    """Tokens query the INPs: cosine similarity times a learnable per-head scale, then ReLU, no softmax.

    Without softmax's normalisation a token unlike every INP gets little attention, so it cannot be rebuilt.
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.learn_scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, inps):
        B, N, C = x.shape
        h = self.num_heads
        q = F.normalize(self.q(x).view(B, N, h, C // h).transpose(1, 2), dim=-1)
        k, v = self.kv(inps).view(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        attn = F.relu(q @ F.normalize(k, dim=-1).transpose(-2, -1) * self.learn_scale)  # (B, h, N, M)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DecoderBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = DecoderAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, inps):
        # No residual around the attention: the output is built from the INPs alone, so an anomalous token
        # has no path to be copied through.
        x = self.attn(self.norm1(x), self.norm1(inps))
        return x + self.mlp(self.norm2(x))

# -----------------------------------------------------------------------------------------------------
# INP-Former


@dataclass
class INPFormerConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    inp_num: int = 6
    decoder_depth: int = 8
    target_layers: list = None  # encoder blocks fused; None: 2..9 for ViT-S/B, every other block 4..18 for ViT-L
    # The fused layers are compared in groups: the mean of the encoder's target_layers at these indices against the
    # mean of the decoder's outputs at the same indices, counted from its last block (see decode).
    fuse_groups: list = ((0, 1, 2, 3), (4, 5, 6, 7))
    geometry: dict = field(default_factory=lambda: dict(PAPER_GEOMETRY))  # how its training images were prepared

    def __post_init__(self):
        if isinstance(self.vit, dict):
            self.vit = ViTConfig(**self.vit)
        if not self.target_layers:
            self.target_layers = range(4, 19, 2) if self.vit.embed_dim >= 1024 else range(2, 10)
        self.target_layers = [int(i) for i in self.target_layers]
        self.fuse_groups = [[int(i) for i in g] for g in self.fuse_groups]


def tokens_to_map(tokens, grid):
    """(B, h*w, D) tokens -> (B, D, h, w) feature map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


class INPFormer(nn.Module):
    """A frozen encoder, one INP Extractor block, a bottleneck MLP and the INP-Guided Decoder. INPFormer(encoder,
    **options): options are INPFormerConfig's fields, whose defaults are the paper's. forward(x) -> (en, de,
    coherence_loss): en and de are lists with one (B, D, H/14, W/14) map per fuse group."""

    def __init__(self, encoder: ViT, **options):
        super().__init__()
        self.config = INPFormerConfig(encoder.config, **options)
        D, H, r = encoder.config.embed_dim, encoder.config.num_heads, encoder.config.mlp_ratio
        self.encoder = encoder.requires_grad_(False)
        # ModuleLists of one element keep the official parameter names (bottleneck.0.*, aggregation.0.*).
        self.bottleneck = nn.ModuleList([Mlp(D, int(D * r))])
        self.aggregation = nn.ModuleList([INPExtractorBlock(D, H, r)])
        self.decoder = nn.ModuleList(DecoderBlock(D, H, r) for _ in range(self.config.decoder_depth))
        self.prototype_token = nn.Parameter(torch.randn(self.config.inp_num, D))  # the M learnable INP queries
        # The official training initialisation of everything but the INP queries (which stay N(0, 1)).
        for m in [*self.bottleneck.modules(), *self.aggregation.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                nn.init.zeros_(m.bias)

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    def encode(self, x, encoder=None):
        """Fused encoder features: the per-group maps (lists of (B, N, D)) and their all-layer mean F.

        encoder: the frozen encoder to run, self.encoder unless given. Training under bf16 autocast passes a
        bf16 copy it made once (train.py owns it): autocast caches the casts of trainable weights only, so it
        would cast the frozen fp32 weights again on every call."""
        encoder = self.encoder if encoder is None else encoder
        with torch.no_grad():
            layers = encoder(x, self.config.target_layers)
            groups = [average([layers[i] for i in g]) for g in self.config.fuse_groups]
            return groups, average(layers)

    def extract_inps(self, fused):
        return self.aggregation[0](self.prototype_token.expand(fused.shape[0], -1, -1), fused)

    def token_grid(self, x):
        return x.shape[-2] // self.encoder.config.patch_size, x.shape[-1] // self.encoder.config.patch_size

    def forward(self, x):
        return self.decode(*self.encode(x), grid=self.token_grid(x))

    def decode(self, en, fused, grid):
        """Everything after the frozen encoder, from the outputs of encode(); grid is the (h, w) token grid."""
        inps = self.extract_inps(fused)
        coherence = inp_distance(fused, inps).mean()  # the INP coherence loss: each token near its nearest INP
        de = [self.bottleneck[0](fused)]
        for blk in self.decoder:
            de.append(blk(de[-1], inps))
        de = de[:0:-1]  # the decoder blocks' outputs, the last one matched with the first encoder group
        de = [average([de[i] for i in g]) for g in self.config.fuse_groups]
        return [tokens_to_map(e, grid) for e in en], [tokens_to_map(d, grid) for d in de], coherence

    def loss(self, x, coherence_weight=0.2):
        """The training objective: soft-mining global cosine loss + 0.2 x INP coherence loss."""
        return self.loss_from_features(*self.encode(x), self.token_grid(x), coherence_weight)

    def loss_from_features(self, en, fused, grid, coherence_weight=0.2):
        """model.loss from encode()'s outputs, so that training can reuse encoder features computed once.
        In fp32 even under autocast: 1 - cos of near-identical vectors needs the precision."""
        en, de, coherence = self.decode(en, fused, grid)
        with torch.autocast(fused.device.type, enabled=False):
            loss = soft_mining_loss([_full(e) for e in en], [_full(d) for d in de])
            return loss + coherence_weight * _full(coherence)

    @torch.no_grad()
    def predict(self, x, out_size=MAP_SIZE, max_ratio=MAX_RATIO):
        """The official evaluation protocol: (B, out_size, out_size) anomaly maps (None: the input size) and (B,)
        image scores, in fp32 whatever the model's dtype."""
        return score_maps(self.raw_maps(x), out_size, max_ratio)

    @torch.no_grad()
    def predict_zero_shot(self, x, out_size=MAP_SIZE, max_ratio=MAX_RATIO):
        """Zero-shot maps: per token, the cosine distance to its nearest INP (no decoder involved)."""
        return score_maps(self.raw_maps(x, zero_shot=True), out_size, max_ratio)

    @torch.no_grad()
    def raw_maps(self, x, zero_shot=False):
        """(B, 3, h, w) inputs -> (B, 1, h, w) fp32 maps at the input's size, before resampling and smoothing: the
        reconstruction error, or with zero_shot the INP distance."""
        if zero_shot:
            _, fused = self.encode(x)
            d = inp_distance(fused, self.extract_inps(fused)).view(-1, 1, *self.token_grid(x))
            return F.interpolate(d, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=True)
        en, de, _ = self(x)
        return anomaly_map(en, de, x.shape[-2:])

# -----------------------------------------------------------------------------------------------------
# Losses and the anomaly map


def inp_distance(tokens, inps, eps=1e-8):
    """Per token, 1 - cosine similarity to its nearest INP: (B, N). Its mean is the INP coherence loss.
    In fp32 also under autocast (it is cheap: M is a handful of INPs)."""
    with torch.autocast(tokens.device.type, enabled=False):
        t = F.normalize(_full(tokens), dim=-1, eps=eps)
        p = F.normalize(_full(inps), dim=-1, eps=eps)
        return (1 - t @ p.transpose(1, 2)).min(dim=-1).values


def soft_mining_loss(en, de, y=3.0):
    """Global cosine loss whose gradient is reweighted per pixel by (d / mean d)^y, d = 1 - cos over channels:
    the value is the plain mean over groups of mean_b(1 - cos(flatten(en_b), flatten(de_b))), but the gradient
    reaching each decoder pixel is scaled, so hard (poorly rebuilt) pixels dominate training."""
    total = 0.0
    for e, d in zip(en, de):
        e = e.detach()
        with torch.no_grad():
            dist = 1 - F.cosine_similarity(e, d, dim=1).unsqueeze(1)  # (B, 1, h, w)
            weight = (dist / dist.mean()) ** y  # the mean over the whole batch, as in the official loss
        d = d.detach() + weight * (d - d.detach())  # same value, gradient scaled by the weight
        total = total + (1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
    return total / len(en)


def anomaly_map(en, de, size):
    """Mean over groups of the per-pixel 1 - cos over channels, upsampled (align_corners=True) to `size`.
    Always in fp32, also under autocast: the maps' small differences are the whole signal."""
    with torch.autocast(en[0].device.type, enabled=False):
        maps = [1 - F.cosine_similarity(_full(e), _full(d), dim=1).unsqueeze(1) for e, d in zip(en, de)]
        maps = [F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=True) for m in maps]
        return torch.cat(maps, dim=1).mean(dim=1, keepdim=True)


def gaussian_kernel(size=GAUSSIAN_SIZE, sigma=GAUSSIAN_SIGMA):
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).view(1, 1, size, size)


def score_maps(maps, out_size=MAP_SIZE, max_ratio=MAX_RATIO):
    """(B, 1, H, W) maps -> resized (bilinear, align_corners=False), the 5x5 sigma-4 Gaussian (zero padding: the
    outer two pixels darken, as in the official protocol), and the image score = mean of the top max_ratio of
    pixels (the maximum when max_ratio is 0). In fp32 always."""
    with torch.autocast(maps.device.type, enabled=False):
        maps = _full(maps)
        if out_size is not None and tuple(maps.shape[-2:]) != (out_size, out_size):
            maps = F.interpolate(maps, size=(out_size, out_size), mode="bilinear", align_corners=False)
        maps = F.conv2d(maps, gaussian_kernel().to(maps), padding=GAUSSIAN_SIZE // 2)[:, 0]
        return maps, image_scores(maps, max_ratio)


def image_scores(maps, max_ratio=MAX_RATIO):
    """(B, H, W) smoothed maps -> (B,) image scores: the mean of the top max_ratio of pixels (0: the maximum)."""
    flat = maps.flatten(1)
    k = int(flat.shape[1] * max_ratio)
    return flat.topk(k, dim=1).values.mean(dim=1) if k > 0 else flat.max(dim=1).values


def _full(t):  # fp32 for half-precision tensors (autocast outputs); fp32/fp64 tensors stay as they are
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

# -----------------------------------------------------------------------------------------------------
# Weights: DINOv2 backbones in torch-hub or Hugging Face names


class WeightsError(ValueError):
    """A weights or checkpoint file that cannot be used; the message is one line naming the file."""


class TimmNames(WeightsError):
    """DINOv2 weights in timm's names, which this file leaves to the project's line/weights.py."""


def first_line(e) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_state_dict(path, tensors=True):
    """(tensors, metadata) from a .safetensors file or a torch .pth/.pt state dict, wrapper prefixes (DDP's
    module.) removed. tensors=False reads only a .safetensors file's header (no tensors), and maps a zip-format
    torch file instead of reading it (its tensors come back, unread until used)."""
    path, meta = os.fspath(path), {}
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    is_safetensors = path.endswith(".safetensors")
    try:
        if is_safetensors:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                # cloned: get_tensor gives views of the mapped file, which a later write to it would change
                sd = {k: f.get_tensor(k).clone() for k in f.keys()} if tensors else {}
                meta = f.metadata() or {}
        else:
            with warnings.catch_warnings():  # torch's multi-line pickle-protocol warnings would break the one line
                warnings.simplefilter("ignore")
                mapped = not tensors and zipfile.is_zipfile(path)
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as e:
        # torch's own message suggests weights_only=False, i.e. running code from the file: never.
        refused = isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e)
        why = "damaged, or holds objects other than tensors" if refused else first_line(e)
        kind = "safetensors file" if is_safetensors else "torch state dict"
        raise WeightsError(f"{path}: not a readable {kind} ({why})") from None
    for wrapper in ("model", "state_dict"):  # training checkpoints often nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    for prefix in ("module.", "dinov2_with_registers.", "dinov2.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, meta


# Hugging Face Dinov2(WithRegisters)Model names -> torch-hub names: these replacements, in this order, on every
# key (e.g. "encoder.layer.3.attention.output.dense.weight" -> "blocks.3.attn.proj.weight").
HF_TO_HUB = [
    ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.", ""),  # cls_token, mask_token, register_tokens
    ("encoder.layer.", "blocks."),
    ("attention.output.dense", "attn.proj"),
    ("attention.attention.", "attn."),  # query, key and value: joined into qkv below
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("layernorm.", "norm."),
]


def hf_to_hub_name(name):
    for old, new in HF_TO_HUB:
        name = name.replace(old, new)
    return name


def to_hub_names(sd):
    """(state dict in torch-hub names, "torch-hub" | "huggingface"), the naming detected from the keys."""
    if not any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        return sd, "torch-hub"
    out = {hf_to_hub_name(k): v for k, v in sd.items()}
    queries = [k for k in out if re.fullmatch(r"blocks\.\d+\.attn\.query\.(weight|bias)", k)]
    for q in queries:  # separate query, key and value projections -> one qkv
        parts = [q.replace("query", part) for part in ("query", "key", "value")]
        out[q.replace("query", "qkv")] = torch.cat([out.pop(p) for p in parts])
    return out, "huggingface"


def vit_config_from_state_dict(sd, num_heads=None):
    """The ViT size of torch-hub-named tensors. The head count is not in them: DINOv2 heads are 64 wide."""
    D = sd["pos_embed"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return ViTConfig(embed_dim=D, depth=depth, num_heads=num_heads or D // 64, num_register_tokens=registers,
                     patch_size=sd["patch_embed.proj.weight"].shape[-1],
                     pos_grid=math.isqrt(sd["pos_embed"].shape[1] - 1),
                     mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D)


def load_strict(module, sd, path):
    """Load `sd` into `module`, failing with one line on any missing or unexpected key or wrong shape. The
    module may be built on the meta device (no memory, no random initialisation): the tensors (in fp32)
    become its parameters."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise WeightsError(f"{path}: {what} key {keys[0]!r}{more}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(f"{path}: {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    module.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    return module


def load_backbone(path, num_heads=None, state_dict=None) -> ViT:
    """A DINOv2 ViT from .safetensors or .pth in torch-hub or Hugging Face names (or from `state_dict`, read from
    `path`); size detected, the naming kept in vit.source. The head count is num_heads, else embed_dim / 64 (every
    released DINOv2)."""
    sd = read_state_dict(path)[0] if state_dict is None else state_dict
    if any(k.startswith("encoder.blocks.") for k in sd):  # an INP-Former checkpoint: take its encoder
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    try:
        sd, source = to_hub_names(sd)
        pos = sd["pos_embed"]
        if "reg_token" in sd or math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:  # timm drops the class position
            raise TimmNames(f"{path}: timm's names (reg_token, no mask_token); line.weights.load_backbone reads them")
        config = vit_config_from_state_dict(sd, num_heads)
    except KeyError as e:
        raise WeightsError(f"{path}: not a DINOv2 ViT state dict (no {e.args[0]!r})") from None
    with torch.device("meta"):  # every parameter is loaded: no random initialisation to throw away
        vit = ViT(config)
    vit = load_strict(vit, sd, path)
    vit.source = source
    return vit


# -----------------------------------------------------------------------------------------------------
# Checkpoints: one .safetensors file, the whole model with its config and what the run records


def save_checkpoint(model: INPFormer, path, metadata=None):
    """Write the whole model (frozen encoder included) as one .safetensors file with its config and `metadata`,
    a dict of what the run records (each value stored as JSON; None values are left out); atomically, so that a
    crash never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    strings = {"format": "pt", "inpformer_config": json.dumps(asdict(model.config))}
    strings.update({k: json.dumps(v) for k, v in (metadata or {}).items() if v is not None})
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=strings)


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary name beside `path`, renamed to `path` once the block succeeds (removed if it fails),
    so that `path` is always either the old file or the whole new one."""
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_model(path, device="cpu") -> INPFormer:
    """An INPFormer (eval mode) from a project checkpoint or an official INP-Former state dict (the authors'
    model.pth), whose config is inferred from its shapes (and whose geometry is the paper's 448 -> 392)."""
    sd, strings = read_state_dict(path)
    if "inpformer_config" not in strings and "decoder.0.attn.learn_scale" not in sd:
        raise WeightsError(f"{path}: not an INP-Former checkpoint (no config metadata, no official keys)")
    try:
        if "inpformer_config" in strings:
            config = INPFormerConfig(**json.loads(strings["inpformer_config"]))
            if "geometry" not in json.loads(strings["inpformer_config"]):  # written before metadata version 2
                old = decode_metadata(strings)
                config.geometry = {k: old.get(k, v) for k, v in PAPER_GEOMETRY.items()}
        else:
            encoder = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
            heads = sd["decoder.0.attn.learn_scale"].shape[0]
            depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder."))
            config = INPFormerConfig(vit_config_from_state_dict(encoder, heads), inp_num=sd["prototype_token"].shape[0],
                                     decoder_depth=depth)
    except KeyError as e:
        raise WeightsError(f"{path}: incomplete INP-Former state dict (no {e.args[0]!r})") from None
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable inpformer_config metadata ({first_line(e)})") from None
    options = {k: getattr(config, k) for k in ("inp_num", "decoder_depth", "target_layers", "fuse_groups", "geometry")}
    with torch.device("meta"):  # every parameter is loaded: no random initialisation to throw away
        model = INPFormer(ViT(config.vit), **options)
    return load_strict(model, sd, path).to(device).eval()


def read_checkpoint_metadata(path) -> dict:
    """The metadata of a checkpoint as one dict, as its file stores it ("inpformer_config" included, an empty dict
    for the authors' model.pth); reads no tensor of a .safetensors file."""
    return decode_metadata(read_state_dict(path, tensors=False)[1])


def decode_metadata(strings) -> dict:
    """safetensors metadata strings -> values. Checkpoints written before the metadata had a version (1) stored
    some values raw: what is not JSON is kept as it is."""
    out = {}
    for k, v in strings.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
