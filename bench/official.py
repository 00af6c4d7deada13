"""Load the official INP-Former implementation from a checkout of luow23/INP-Former, for speed comparisons.

Nothing of it is copied here: `--official PATH` points the benchmarks at the user's own checkout. Its training
helpers import packages the comparison never calls (scikit-learn, OpenCV, kornia, adeval, ...); those are
stubbed so that only the model, loss and optimiser code runs. xformers stays off, as the authors require.
"""
import importlib
import importlib.machinery
import os
import sys
from functools import partial
from unittest import mock

import torch
import torch.nn as nn


def import_modules(path):
    os.environ["XFORMERS_DISABLED"] = "1"
    sys.path.insert(0, os.fspath(path))
    for name in ("sklearn", "sklearn.metrics", "cv2", "matplotlib", "matplotlib.pyplot", "skimage",
                 "skimage.measure", "pandas", "kornia", "kornia.geometry", "kornia.augmentation", "adeval",
                 "tqdm", "scipy", "scipy.ndimage", "scipy.interpolate", "aug_funcs", "timm", "timm.data",
                 "timm.models", "timm.models.layers", "timm.models.vision_transformer"):
        try:
            importlib.import_module(name)
        except Exception:
            stub = sys.modules[name] = mock.MagicMock()
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
    import warnings

    warnings.filterwarnings("ignore", message="xFormers")
    return importlib.import_module


def build(path, size="base", inp_num=6, encoder=None):
    """The official model as its multi-class script assembles it: `encoder` (default: a random DINOv2 with
    registers), then the heads in the script's order, so that a seeded run draws their weights as the script does
    (its initialisation is the caller's)."""
    imp = import_modules(path)
    heads_mod = imp("models.vision_transformer")
    uad = imp("models.uad")
    dim, heads = {"small": (384, 6), "base": (768, 12), "large": (1024, 16)}[size]
    layers = list(range(4, 19, 2)) if size == "large" else list(range(2, 10))
    if encoder is None:
        vt = imp("dinov2.models.vision_transformer")
        encoder = getattr(vt, f"vit_{size}")(patch_size=14, img_size=518, block_chunks=0, init_values=1e-8,
                                            num_register_tokens=4, interpolate_antialias=False,
                                            interpolate_offset=0.1)
    norm = partial(nn.LayerNorm, eps=1e-8)
    bottleneck = nn.ModuleList([heads_mod.Mlp(dim, dim * 4, dim, drop=0.0)])
    inp = nn.ParameterList([nn.Parameter(torch.randn(inp_num, dim))])
    aggregation = nn.ModuleList([heads_mod.Aggregation_Block(dim=dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                                                             norm_layer=norm)])
    decoder = nn.ModuleList([heads_mod.Prototype_Block(dim=dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                                                       norm_layer=norm) for _ in range(8)])
    return uad.INP_Former(encoder=encoder, bottleneck=bottleneck, aggregation=aggregation, decoder=decoder,
                          target_layers=layers, fuse_layer_encoder=[[0, 1, 2, 3], [4, 5, 6, 7]],
                          fuse_layer_decoder=[[0, 1, 2, 3], [4, 5, 6, 7]], remove_class_token=True,
                          prototype_token=inp)


def train_step_fn(path, model):
    """One official training iteration: loss with the soft-mining hook, backward, clip 0.1, StableAdamW."""
    imp = import_modules(path)
    utils = imp("utils")
    opt_mod = imp("optimizers.StableAdamW")
    trainable = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    opt = opt_mod.StableAdamW([{"params": trainable}], lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4,
                              amsgrad=True, eps=1e-10)

    def step(x):
        en, de, g_loss = model(x)
        loss = utils.global_cosine_hm_adaptive(en, de, y=3) + 0.2 * g_loss
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, max_norm=0.1)
        opt.step()
        return loss

    return step
