"""A PatchCore-style nearest-neighbour baseline on the same frozen encoder: a reference point beside
INP-Former's table (`evaluate.py --baseline knn`), so that a user sees on their own data whether INP-Former is
the right tool. Short on purpose: a sanity baseline, not a second method to tune.

Per class, a memory bank of the patch tokens of the class's training images (the same images, geometry and
tiles as the model's): each token's feature is the mean over the model's target layers of that layer's token
after a LayerNorm without affine parameters, L2-normalised. A test token's anomaly is its smallest cosine
distance to the bank; the token map then takes the model's own path (upsampled to the input, stitched over
tiles, resampled to 256 x 256, smoothed by the same Gaussian), and the image score is the map's maximum
(PatchCore's rule; for a tiled frame under the "tiles" rule, its best tile's maximum). A bank larger than
bank_size tokens is subsampled at random, seeded.
"""
import time

import torch
import torch.nn.functional as F

import evaluate
import line.frames

BANK_SIZE = 65536  # tokens kept per class: 192 MiB at ViT-B's 768 dimensions


def token_features(model, x):
    """(B, 3, h, w) -> (B, N, D): per patch token, the mean over the target layers of the LayerNorm'd (no affine)
    tokens, L2-normalised."""
    layers = model.encoder(x, model.config.target_layers)
    mean = torch.stack([F.layer_norm(t.float(), t.shape[-1:]) for t in layers]).mean(dim=0)
    return F.normalize(mean, dim=-1)


class KNNBaseline:
    """The baseline for one class: fit(images) builds the bank, predict(frames) scores like the model does."""

    def __init__(self, model, bank_size=BANK_SIZE, seed=0, batch_size=16):
        self.model, self.bank_size, self.seed, self.batch_size = model, bank_size, seed, batch_size
        self.bank = None

    @torch.no_grad()
    def fit(self, dataset, workers=0):
        """The bank from every training sample of `dataset` (images, or tiles of a tiled geometry): a uniform
        random subset of at most bank_size of their tokens, drawn as they come (each token a seeded random
        priority, the lowest bank_size kept), so memory stays at the bank's size."""
        p = self.model.prototype_token
        generator = torch.Generator().manual_seed(self.seed)
        bank, priority = None, None
        for batch in torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=workers):
            tokens = token_features(self.model, batch["image"].to(p.device, p.dtype)).flatten(0, 1).cpu()
            drawn = torch.rand(len(tokens), generator=generator)
            if bank is not None:
                tokens, drawn = torch.cat([bank, tokens]), torch.cat([priority, drawn])
            keep = drawn.argsort()[:self.bank_size] if len(tokens) > self.bank_size else slice(None)
            bank, priority = tokens[keep], drawn[keep]
        self.bank = bank.to(p.device)
        return self

    def raw_maps(self, x):
        """(B, 3, h, w) -> (B, 1, h, w): each token's smallest cosine distance to the bank, upsampled as the
        model upsamples its maps (bilinear, align_corners=True)."""
        t = token_features(self.model, x.to(self.bank.device, self.model.prototype_token.dtype))
        best = torch.full(t.shape[:2], -2.0, device=t.device)
        for chunk in self.bank.split(8192):  # (B, N, 8192) similarities at a time
            best = torch.maximum(best, (t @ chunk.T).max(dim=-1).values)
        d = (1 - best).view(-1, 1, *self.model.token_grid(x))
        return F.interpolate(d, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=True)

    @torch.no_grad()
    def predict(self, frames, geometry):
        """(B, 256, 256) maps and (B,) scores, the map's maximum, for frames prepared with `geometry` (a batch,
        or for tiles a list of frames, stitched and scored as the model's tiles: under the "tiles" rule the score
        is the highest tile's maximum)."""
        if geometry.tile is None:
            return line.frames.score_as(geometry, self.raw_maps(frames), max_ratio=0)
        maps, scores = [], []
        for frame in frames:
            frame_maps, best_tile = line.frames.stitch_tiles(frame[None], geometry.tile, geometry.tile_overlap,
                                                             self.raw_maps, self.batch_size, max_ratio=0)
            m, s = line.frames.score_tiled(frame_maps, best_tile, geometry.image_score, max_ratio=0)
            maps.append(m)
            scores.append(s)
        return torch.cat(maps), torch.cat(scores)


def evaluate_class(model, train_set, ds, opts, log):
    """The seven metrics of the kNN baseline (line/knn.py) on one class's test set `ds`: its bank from the class's
    training set `train_set`, prepared as the model's images."""
    t0 = time.monotonic()
    cls = ds.samples[0].cls
    knn = KNNBaseline(model, opts.bank_size, batch_size=opts.batch_size).fit(train_set, opts.workers)
    acc, _ = evaluate.score_class(model, ds, opts, predictor=knn.predict)
    m = acc.compute(warn=lambda msg: log(f"  note: {cls} (knn baseline): {msg}"))
    log(f"  {cls} (knn baseline, {len(knn.bank)} tokens in its bank) in {time.monotonic() - t0:.1f}s; "
        + " ".join(f"{k} {evaluate.cell(m[k])}" for k in evaluate.METRICS))
    return {k: m[k] for k in evaluate.METRICS}
