"""The DINOv2-with-registers backbones train.py downloads when no --weights is given, each cached once."""
import os
import urllib.request
from pathlib import Path

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
