"""line/weights.py: DINOv2 files in timm's names load as the same backbone."""
import torch
from safetensors.torch import load_file, save_file

import inpformer
import line.weights
from conftest import shared
from test_model import TINY, features, hub_state_dict, timm_names


def test_timm_names_give_the_same_backbone(tmp_path):
    x = load_file(shared(*TINY, "io.safetensors"))["x_224"]
    save_file(timm_names(hub_state_dict()), tmp_path / "timm.safetensors")
    vit = line.weights.load_backbone(tmp_path / "timm.safetensors")
    ref = inpformer.load_backbone(shared(*TINY, "backbone_hub.safetensors"))
    assert vit.source == "timm" and vit.config.num_register_tokens == 4 and vit.config.depth == 10
    assert torch.allclose(features(vit, x), features(ref, x), atol=1e-5)
