"""train.py --cache-features: the frozen encoder's outputs for every training image computed once, into files in
the run folder that every torchrun process memory-maps, so that each step runs only the trainable part.
"""
import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
import inpformer
import train


@dataclass
class FeatureCache(torch.utils.data.Dataset):
    """The frozen encoder's outputs for every training image, in files under <out>/feature_cache/ that every
    process memory-maps: en.bin (N, groups, tokens, D), fused.bin (N, tokens, D), and cache.json, written last,
    which records what they were made from. The training images are not augmented on the fly, so the features
    never change: a resumed run reuses the files, and --keep-cache keeps them after the run."""
    folder: Path
    en: torch.Tensor
    fused: torch.Tensor
    grid: tuple

    def __len__(self):
        return len(self.fused)

    def __getitems__(self, idx):
        """The features of the images `idx`, gathered from the files (in a loader worker, a batch ahead)."""
        idx = torch.tensor(idx)
        return self.en.index_select(0, idx), self.fused.index_select(0, idx)

    @staticmethod
    def collate(batch):
        return batch  # __getitems__ gathered it

    def on_device(self, batch, device):
        """A gathered batch as loss_from_features takes it, in fp32 on `device`."""
        en, fused = (t.to(device, non_blocking=True).float() for t in batch)
        return list(en.unbind(1)), fused, self.grid


def feature_cache(run, encoder, recipe, batch_size, log) -> FeatureCache:
    """The run's feature cache: the one in <out>/feature_cache when it was made from `recipe`, else made now,
    each process encoding its share of the images into the shared files."""
    folder, model, n = run.out / "feature_cache", run.model, len(run.dataset)
    p = model.encoder.config.patch_size
    h, w = data.geometry_of(model.config.geometry).input_size()
    grid, width, groups = (h // p, w // p), model.encoder.config.embed_dim, len(model.config.fuse_groups)
    shapes = {"en": (n, groups, grid[0] * grid[1], width), "fused": (n, grid[0] * grid[1], width)}
    dtype = train.PRECISIONS[recipe["dtype"]]
    recipe = dict(recipe, shapes={k: list(v) for k, v in shapes.items()})
    files = {k: str(folder / f"{k}.bin") for k in shapes}
    found = None
    with contextlib.suppress(OSError, ValueError):  # no cache yet, or one cut short before cache.json
        found = json.loads((folder / "cache.json").read_text())
    if found == recipe:
        log(f"feature cache: reusing {folder} ({_gib(folder):.2f} GiB)")
    else:
        if found is not None:
            log(f"feature cache: {folder} was made from other data or settings; making it again")
        t0 = time.time()
        if run.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for k, shape in shapes.items():
                with open(files[k], "wb") as f:
                    f.truncate(math.prod(shape) * dtype.itemsize)
        _barrier(run)
        mapped = {k: torch.from_file(files[k], shared=True, size=math.prod(s), dtype=dtype).view(s)
                  for k, s in shapes.items()}
        lo, hi = n * run.rank // run.world, n * (run.rank + 1) // run.world  # this process's share
        share = torch.utils.data.Subset(run.dataset, range(lo, hi))
        done = lo
        for batch in torch.utils.data.DataLoader(share, batch_size=batch_size, num_workers=run.workers):
            with run.amp:
                en, fused = model.encode(batch["image"].to(run.device), encoder)
            b = len(fused)
            mapped["en"][done:done + b] = torch.stack(en, 1).to("cpu", dtype)
            mapped["fused"][done:done + b] = fused.to("cpu", dtype)
            done += b
        del mapped  # unmapped: the writes are in the files
        _barrier(run)
        if run.rank == 0:
            with inpformer.atomic_write(folder / "cache.json") as tmp:
                Path(tmp).write_text(json.dumps(recipe, indent=1))
        _barrier(run)
        log(f"feature cache: encoded {n} images in {time.time() - t0:.0f}s into {folder} ({_gib(folder):.2f} GiB)")
    en, fused = (torch.from_file(files[k], shared=False, size=math.prod(s), dtype=dtype).view(s)
                 for k, s in shapes.items())
    return FeatureCache(folder, en, fused, grid)


def _gib(folder):
    return sum(f.stat().st_size for f in Path(folder).glob("*.bin")) / 2**30


def _barrier(run):
    if run.world > 1:
        dist.barrier()
