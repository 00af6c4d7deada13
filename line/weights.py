"""Backbone conveniences: the DINOv2-with-registers weights train.py downloads when no --weights is given (each
cached once), and DINOv2 files in timm's names.
"""
import math
import os
import urllib.request
from pathlib import Path

import torch

import inpformer

HF_WEIGHTS = "https://huggingface.co/facebook/dinov2-with-registers-{size}/resolve/main/model.safetensors"


def download_backbone(size="base", log=print) -> Path:
    """The Hugging Face DINOv2-with-registers file of `size`, downloaded once into ~/.cache/inpformer (or
    $INPFORMER_CACHE); offline, a one-line error says what to download and where to put it."""
    cache = Path(os.environ.get("INPFORMER_CACHE", Path.home() / ".cache" / "inpformer"))
    path, url = cache / f"dinov2-with-registers-{size}.safetensors", HF_WEIGHTS.format(size=size)
    if path.is_file():
        return path
    log(f"downloading {url} to {path}")
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0)
            with inpformer.atomic_write(path) as tmp:
                _copy(response, tmp, total, log)
    except OSError as e:
        raise inpformer.WeightsError(f"could not download the DINOv2 weights ({getattr(e, 'reason', e)}): download "
                                     f"{url} and save it as {path}, or pass --weights PATH") from None
    return path


def _copy(response, path, total, log):
    done = 0
    with open(path, "wb") as f:
        while True:
            chunk = response.read(1 << 24)
            if not chunk:
                return
            done += f.write(chunk)
            log(f"  {done >> 20} / {total >> 20} MiB")


def load_backbone(path, num_heads=None) -> inpformer.ViT:
    """inpformer.load_backbone, also for a file in timm's names (vit.source "timm")."""
    try:
        return inpformer.load_backbone(path, num_heads)
    except inpformer.TimmNames:
        vit = inpformer.load_backbone(path, num_heads, state_dict=from_timm(inpformer.read_state_dict(path)[0]))
        vit.source = "timm"
        return vit


def from_timm(sd) -> dict:
    """timm's DINOv2 names -> torch-hub's. timm folds the class position into cls_token and drops mask_token;
    putting a zero class slot back is exact, since that slot is only ever added to the class token."""
    sd = dict(sd)
    if "reg_token" in sd:
        sd["register_tokens"] = sd.pop("reg_token")
    pos = sd.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        sd["pos_embed"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
    if "mask_token" not in sd and "cls_token" in sd:
        sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1], dtype=sd["cls_token"].dtype)
    return sd
