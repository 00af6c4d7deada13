"""line/knn.py: the PatchCore-style baseline on the same encoder, against the numbers the fixture's README reports."""
import torch

import data
import evaluate
import inpformer
from conftest import shared
from line import knn


def test_the_knn_baseline_is_within_a_few_points_of_the_texture_ad_patchcore_numbers():
    """The PatchCore-style kNN on the real ViT-S/14, texture_ad at 256 -> 224, every training token in the bank:
    the fixture's README reports I-AUROC 1.000/0.788 and P-AUROC 0.995/0.939 (brick/grass)."""
    root = shared("fixtures", "texture_ad")
    vit = inpformer.load_backbone(shared("weights", "dinov2_vits14_imgfocus", "model.safetensors"))
    model = inpformer.INPFormer(vit, geometry=data.ResizeCrop(256, 224).to_dict()).eval()
    reference = {"brick": (1.000, 0.995), "grass": (0.788, 0.939)}
    opts = evaluate.Options(batch_size=16, device="cpu", bank_size=knn.BANK_SIZE)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cls, (i_auroc, p_auroc) in reference.items():
            ds = data.test_set("folder", root, cls, data.ResizeCrop(256, 224))
            train = data.train_set("folder", root, cls, data.ResizeCrop(256, 224))
            got = knn.evaluate_class(model, train, ds, opts, log=lambda m: None)
            assert abs(got["I-AUROC"] - i_auroc) <= 0.03 and abs(got["P-AUROC"] - p_auroc) <= 0.02, (cls, got)
    finally:
        torch.set_num_threads(threads)  # as it was: later tests' in-process maps must not change
