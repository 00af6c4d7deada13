"""INP-Former in one file: the model, its losses and anomaly maps, the evaluation protocol, DINOv2 weights and
INP-Former checkpoints.

Luo et al., "Exploring Intrinsic Normal Prototypes within a Single Image for Universal Anomaly Detection",
CVPR 2025. Numerically faithful to the official code (luow23/INP-Former); parameter names match its state
dict, so the authors' `model.pth` loads as is.

    import inpformer
    model = inpformer.INPFormer(inpformer.load_backbone("dinov2_vitb14_reg4_pretrain.pth"))
    loss = model.loss(x)                      # x: (B, 3, 392, 392), ImageNet-normalised
    maps, scores = model.predict(x)           # (B, 256, 256) anomaly maps, (B,) image scores
    inpformer.save_checkpoint(model, "model.safetensors", {"data": "mvtec"})
    model = inpformer.load_model("model.safetensors")   # or the authors' model.pth
    model.config.geometry                     # how its images must be prepared: resize 448, crop 392

This file is also the one home of the facts every script shares: the evaluation protocol (MAP_SIZE,
GAUSSIAN_SIZE, GAUSSIAN_SIGMA, MAX_RATIO), the input geometry a model was trained at (Geometry, in
the model's config) and what a checkpoint records (Metadata).

Depends on torch; safetensors is used for file I/O only. It can be copied into another project on its own.
"""
import contextlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------
# The official evaluation protocol (utils.evaluation_batch(max_ratio=0.01, resize_mask=256))

MAP_SIZE = 256        # anomaly maps (and ground-truth masks) are resampled to 256 x 256 before scoring
GAUSSIAN_SIZE = 5     # then smoothed by a 5 x 5 Gaussian of sigma 4, zero padding
GAUSSIAN_SIGMA = 4.0
MAX_RATIO = 0.01      # image score: the mean of the top 1 % of the smoothed map's pixels

# -----------------------------------------------------------------------------------------------------
# Input geometry: how an image becomes the model's input


@dataclass(frozen=True)
class Geometry:
    """How an image becomes the model's input, recorded in every checkpoint's config (so that a loaded model says
    how it must be fed). Sizes are (height, width); a whole number n means (n, n).

    - image_size: the bilinear resize of every frame (the aspect follows it: frames of other shapes are
      stretched to it), or None: each frame keeps its own size (tiles only; a frame smaller than a tile is
      enlarged, aspect kept, until a tile fits).
    - crop_size: the centre crop of the resized frame the model sees, the paper's protocol (448 -> 392); or None:
      the whole frame, every pixel of it.
    - tile, tile_overlap: the resized frame is covered by tile x tile squares, neighbours sharing the fraction
      tile_overlap of a tile, the last row and column flush with the frame's edges; the model scores each tile
      on its own (its own INPs) and the tiles' maps are averaged where they overlap. None: the whole input.
    - bit_depth: the significant bits of 16-bit, 32-bit integer and float grey images (e.g. 12 for a 12-bit
      sensor in 16-bit files), scaled to the model's range by 2^bit_depth - 1; None: 16 for integer images,
      and float images must hold values in [0, 1]. 8-bit images are read as they are.

    The paper's protocol scores its crop's map with a zero-padded Gaussian, which darkens the border pixels;
    the whole-frame and tiled geometries pad by reflection, so that a defect at the border scores like one
    inside (map_padding)."""
    image_size: tuple = (448, 448)
    crop_size: tuple = (392, 392)
    tile: int = None
    tile_overlap: float = 0.0
    bit_depth: int = None

    def __post_init__(self):
        for name in ("image_size", "crop_size"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value, value)
            object.__setattr__(self, name, tuple(int(v) for v in value) if value is not None else None)

    @property
    def whole_frame(self) -> bool:
        return self.crop_size is None

    @property
    def map_padding(self) -> str:
        """The Gaussian's padding: the paper's zeros for its crop, reflection for whole frames and tiles."""
        return "zeros" if self.crop_size is not None else "reflect"

    def check(self, patch_size=14):
        """The one rule for the sizes; raises ValueError naming the flag. Returns the geometry."""
        def multiple(flag, size, why=""):
            if any(n < patch_size or n % patch_size for n in size):
                suggestion = _hw([max(n // patch_size, 1) * patch_size for n in size])
                raise ValueError(f"{flag} {_hw(size)} must be a multiple of the model's patch size {patch_size}"
                                 f"{why} (e.g. {suggestion})")

        if self.image_size is None and self.tile is None:
            raise ValueError("--image-size native keeps each frame's own size: it needs --tile N")
        if self.tile is not None:
            multiple("--tile", (self.tile, self.tile))
            if self.crop_size is not None:
                raise ValueError(f"tiles (--tile {self.tile}, given or the checkpoint's) cover the whole frame: pass "
                                 "--crop-size none, or --tile none")
            if not 0.0 <= self.tile_overlap < 1.0:
                raise ValueError(f"--tile-overlap {self.tile_overlap} must be at least 0 and below 1")
            if self.image_size is not None and min(self.image_size) < self.tile:
                raise ValueError(f"--tile {self.tile} must fit in --image-size {_hw(self.image_size)}")
        elif self.crop_size is None:
            multiple("--image-size", self.image_size, " (with --crop-size none the whole frame is the input)")
        else:
            multiple("--crop-size", self.crop_size)
            if any(c > i for c, i in zip(self.crop_size, self.image_size)):
                raise ValueError(f"--crop-size {_hw(self.crop_size)} must be at most --image-size "
                                 f"{_hw(self.image_size)}")
        if self.bit_depth is not None and not 1 <= self.bit_depth <= 32:
            raise ValueError(f"--bit-depth {self.bit_depth} must be between 1 and 32")
        return self

    def frame_size(self, height, width) -> tuple:
        """(height, width) of the resized frame of an original height x width image."""
        if self.image_size is not None:
            return self.image_size
        scale = max(1.0, self.tile / width, self.tile / height)  # a frame smaller than a tile is enlarged
        return max(self.tile, round(height * scale)), max(self.tile, round(width * scale))

    def crop_box(self, frame_height, frame_width) -> tuple:
        """(top, left, height, width) of the model's input in the resized frame: the centre crop (torchvision
        CenterCrop's rounding), or the whole frame."""
        if self.crop_size is None:
            return 0, 0, frame_height, frame_width
        h, w = self.crop_size
        return int(round((frame_height - h) / 2.0)), int(round((frame_width - w) / 2.0)), h, w

    def input_size(self) -> tuple:
        """(height, width) of what the model sees: a tile, the crop, or the whole resized frame."""
        if self.tile is not None:
            return self.tile, self.tile
        return self.crop_size if self.crop_size is not None else self.image_size

    def tile_positions(self, frame_height, frame_width) -> list:
        """(top, left) of every tile of a resized frame, row by row; [(0, 0)] when not tiled."""
        if self.tile is None:
            return [(0, 0)]
        return [(top, left) for top in _tile_starts(frame_height, self.tile, self.tile_overlap)
                for left in _tile_starts(frame_width, self.tile, self.tile_overlap)]

    def describe(self) -> str:
        size = "each frame's own size" if self.image_size is None else _hw(self.image_size)
        if self.tile is not None:
            text = f"{size}, tiles of {self.tile} px overlapping {self.tile_overlap:g}"
        elif self.crop_size is None:
            text = f"{size} px, the whole frame"
        else:
            text = f"{size} -> {_hw(self.crop_size)} px"
        return text + (f", {self.bit_depth}-bit" if self.bit_depth else "")


def _hw(size) -> str:
    """448 for (448, 448), 350x140 for (350, 140): sizes as the command line writes them."""
    if isinstance(size, int):
        return str(size)
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def _tile_starts(length, tile, overlap):
    """Where tiles start along one side: `tile * (1 - overlap)` apart, the last one flush with the far edge."""
    if length < tile:
        raise ValueError(f"a side of {length} px is shorter than a {tile} px tile")
    stride = max(1, round(tile * (1 - overlap)))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts

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
    fuse_groups: list = ((0, 1, 2, 3), (4, 5, 6, 7))  # indices into target_layers (and reversed decoder outputs)
    geometry: Geometry = field(default_factory=Geometry)  # how the model's training images were prepared

    def __post_init__(self):
        if isinstance(self.vit, dict):
            self.vit = ViTConfig(**self.vit)
        if isinstance(self.geometry, dict):
            self.geometry = Geometry(**self.geometry)
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
        coherence = inp_distance(fused, inps).mean()
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
    def predict(self, x, out_size=MAP_SIZE, max_ratio=MAX_RATIO, padding="zeros"):
        """The official evaluation protocol: (B, out_size, out_size) anomaly maps (None: the input size) and (B,)
        image scores, in fp32 whatever the model's dtype. padding: the Gaussian's, see score_maps."""
        return score_maps(self.raw_maps(x), out_size, max_ratio, padding)

    @torch.no_grad()
    def predict_zero_shot(self, x, out_size=MAP_SIZE, max_ratio=MAX_RATIO, padding="zeros"):
        """Zero-shot maps: per token, the cosine distance to its nearest INP (no decoder involved)."""
        return score_maps(self.raw_maps(x, zero_shot=True), out_size, max_ratio, padding)

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
            weight = (dist / dist.mean()) ** y
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


def score_maps(maps, out_size=MAP_SIZE, max_ratio=MAX_RATIO, padding="zeros"):
    """(B, 1, H, W) maps -> resized (bilinear, align_corners=False), the 5x5 sigma-4 Gaussian, and the image
    score = mean of the top max_ratio of pixels (the maximum when max_ratio is 0). In fp32 always. padding:
    "zeros", the paper's protocol for its crop (the outer two pixels darken, and the resize is plain bilinear);
    or "reflect", for whole frames and tiles: the border scores like the inside, and the resize is antialiased,
    since a frame can be many times the map's size, where plain bilinear would keep or drop a narrow peak
    depending on where it falls."""
    with torch.autocast(maps.device.type, enabled=False):
        maps = _full(maps)
        if out_size is not None and tuple(maps.shape[-2:]) != (out_size, out_size):
            maps = F.interpolate(maps, size=(out_size, out_size), mode="bilinear", align_corners=False,
                                 antialias=padding == "reflect")
        half = GAUSSIAN_SIZE // 2
        if padding == "reflect":
            maps = F.conv2d(F.pad(maps, (half, half, half, half), mode="reflect"), gaussian_kernel().to(maps))[:, 0]
        elif padding == "zeros":
            maps = F.conv2d(maps, gaussian_kernel().to(maps), padding=half)[:, 0]
        else:
            raise ValueError(f"padding {padding!r}: use zeros or reflect")
        flat = maps.flatten(1)
        k = int(flat.shape[1] * max_ratio)
        if k > 0:
            scores = flat.topk(k, dim=1).values.mean(dim=1)
        else:
            scores = flat.max(dim=1).values
    return maps, scores


def _full(t):  # fp32 for half-precision tensors (autocast outputs); fp32/fp64 tensors stay as they are
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

# -----------------------------------------------------------------------------------------------------
# Weights: DINOv2 backbones in torch-hub, Hugging Face or timm names


class WeightsError(ValueError):
    """A weights or checkpoint file that cannot be used; the message is one line naming the file."""


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
    """(state dict in torch-hub names, "torch-hub" | "huggingface" | "timm"), the naming detected from the keys."""
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        out = {hf_to_hub_name(k): v for k, v in sd.items()}
        queries = [k for k in out if re.fullmatch(r"blocks\.\d+\.attn\.query\.(weight|bias)", k)]
        for q in queries:  # separate query, key and value projections -> one qkv
            parts = [q.replace("query", part) for part in ("query", "key", "value")]
            out[q.replace("query", "qkv")] = torch.cat([out.pop(p) for p in parts])
        return out, "huggingface"

    pos = sd.get("pos_embed")
    pos_without_class_slot = pos is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]
    if "reg_token" in sd or pos_without_class_slot:
        # timm folds the class position into cls_token and drops mask_token; putting a zero class slot back
        # is exact, since that slot is only ever added to the class token.
        sd = dict(sd)
        if "reg_token" in sd:
            sd["register_tokens"] = sd.pop("reg_token")
        if pos_without_class_slot:
            sd["pos_embed"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
        if "mask_token" not in sd and "cls_token" in sd:
            sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1], dtype=sd["cls_token"].dtype)
        return sd, "timm"
    return sd, "torch-hub"


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


def load_backbone(path, num_heads=None) -> ViT:
    """A DINOv2 ViT from .safetensors or .pth in torch-hub, Hugging Face or timm names; size detected, the
    naming kept in vit.source. The head count is num_heads, else embed_dim / 64 (every released DINOv2)."""
    sd, _ = read_state_dict(path)
    if any(k.startswith("encoder.blocks.") for k in sd):  # an INP-Former checkpoint: take its encoder
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    try:
        sd, source = to_hub_names(sd)
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


METADATA_VERSION = 2  # 1: checkpoints written before the schema had a number (and kept the sizes here)


@dataclass
class Metadata:
    """What a project checkpoint records besides its tensors and config (the one definition: train.py writes
    it, evaluate.py and predict.py read it). Every field may be absent (None) in files from elsewhere."""
    version: int = METADATA_VERSION
    data: str = None              # the data set(s) trained on, a comma list for super-multi-class
    data_root: str = None         # their folders, a comma list in the same order
    classes: list = None          # every class trained on
    classes_per_set: list = None  # the classes of each data set, in the order of `data`
    setting: str = None           # multi, single or few-shot
    shots: int = None             # few-shot: training images per class
    backbone: str = None          # the weights file or size the encoder came from
    seed: int = None
    total_iters: int = None
    iteration: int = None         # iterations done when the file was written
    finished: bool = None         # iteration == total_iters
    calibration: dict = None      # the decision rule predict.py --calibrate stores (see predict.calibration)
    extra: dict = field(default_factory=dict)  # any other key, kept as it was (e.g. a user's own notes)

    def to_strings(self) -> dict:
        """safetensors metadata (strings only): every value as JSON, so that it reads back as it was."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        values = {"metadata_version": values.pop("version"), **values, **self.extra}
        return {k: json.dumps(v) for k, v in values.items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict) -> "Metadata":
        """Metadata's fields by name, any other key into extra; the current version unless one is given."""
        known = {f.name for f in fields(cls)} - {"version", "extra"}
        extra = {k: v for k, v in values.items() if k not in known and k != "metadata_version"}
        version = values.get("metadata_version", METADATA_VERSION)
        return cls(version=version, extra=extra, **{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_strings(cls, strings: dict) -> "Metadata":
        """The Metadata a checkpoint's strings hold. Files of version 1 stored strings raw: what is not JSON is
        taken as it is."""
        decoded = {}
        for k, v in strings.items():
            if k in ("format", "inpformer_config"):  # safetensors' own key, and the model's config
                continue
            try:
                decoded[k] = json.loads(v)
            except ValueError:
                decoded[k] = v
        if "metadata_version" not in decoded:
            decoded["metadata_version"] = 1 if decoded else None  # None: no metadata at all (the authors' .pth)
        return cls.from_dict(decoded)


def save_checkpoint(model: INPFormer, path, metadata=None):
    """Write the whole model (frozen encoder included) as one .safetensors file with its config and `metadata`
    (a Metadata, or a dict of its fields and any other keys); atomically, so that a crash never leaves a
    half-written checkpoint."""
    from safetensors.torch import save_file

    if not isinstance(metadata, Metadata):
        metadata = Metadata.from_dict(metadata or {})
    strings = {"format": "pt", "inpformer_config": json.dumps(asdict(model.config)), **metadata.to_strings()}
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
            if "geometry" not in json.loads(strings["inpformer_config"]):  # written before version 2
                old = Metadata.from_strings(strings).extra
                config.geometry = Geometry(old.get("image_size", 448), old.get("crop_size", 392))
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


def read_metadata(path) -> Metadata:
    """The Metadata of a checkpoint (every field None for the authors' model.pth, which records nothing); reads
    no tensor of a .safetensors file."""
    return Metadata.from_strings(read_state_dict(path, tensors=False)[1])


def read_checkpoint_metadata(path) -> dict:
    """The metadata of a checkpoint as one dict (values JSON-decoded), as its file stores it: Metadata's fields
    under their own names (the version as "metadata_version"), any other keys, and "inpformer_config"."""
    out = {}
    for k, v in read_state_dict(path, tensors=False)[1].items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
