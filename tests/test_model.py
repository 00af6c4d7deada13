"""inpformer.py against the official model: golden tensors of ../shared/fixtures/official_tiny, real DINOv2
ViT-S/14 features, weight formats, checkpoints and the errors bad files give."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import inpformer
import train
from conftest import ROOT, shared

TINY = "fixtures", "official_tiny"
SIZES = (224, 392)


@pytest.fixture(scope="module")
def io():
    return load_file(shared(*TINY, "io.safetensors"))


def official_heads():
    sd = load_file(shared(*TINY, "inpformer_official.safetensors"))
    return {k: v for k, v in sd.items() if not k.startswith("encoder.")}


def model_from(source):
    """The tiny official model, its encoder read from one of the three files."""
    if source == "official":
        return inpformer.load_model(shared(*TINY, "inpformer_official.safetensors"))
    model = inpformer.INPFormer(inpformer.load_backbone(shared(*TINY, f"backbone_{source}.safetensors")))
    missing, unexpected = model.load_state_dict(official_heads(), strict=False)
    assert not unexpected and all(k.startswith("encoder.") for k in missing)
    return model.eval()


def assert_close(name, got, ref, rel=1e-4):
    got, ref = got.detach().float(), ref.float().reshape(got.shape)
    err = (got - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"{name}: max|diff| {err:.3g} vs max|ref| {ref.abs().max():.3g}"


def assert_scalar(name, got, ref):
    got, ref = float(torch.as_tensor(got).detach()), float(ref)
    assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref)), f"{name}: {got} vs {ref}"


@pytest.mark.parametrize("source", ["official", "hub", "hf"])
@pytest.mark.parametrize("size", SIZES)
def test_reproduces_official_fixture(io, source, size):
    model = model_from(source)
    x = io[f"x_{size}"]
    en, de, coherence = model(x)
    for i in range(2):
        assert en[i].shape == (2, 128, size // 14, size // 14)
        assert_close(f"en_{size}_{i}", en[i], io[f"en_{size}_{i}"])
        assert_close(f"de_{size}_{i}", de[i], io[f"de_{size}_{i}"])
    assert_scalar("g_loss", coherence, io[f"g_loss_{size}"])

    maps, scores = model.predict(x, out_size=None)
    assert maps.shape == (2, size, size)
    assert_close("map", maps, io[f"map_{size}"])
    assert_close("score", scores, io[f"score_{size}"])
    maps, scores = model.predict(x)
    assert maps.shape == (2, 256, 256)
    assert_close("map256", maps, io[f"map256_{size}"])
    assert_close("score256", scores, io[f"score256_{size}"])

    model.zero_grad()
    loss = model.loss(x)
    loss.backward()
    assert_scalar("loss", loss, io[f"loss_{size}"])
    assert_scalar("loss_cos", inpformer.soft_mining_loss(en, de), io[f"loss_cos_{size}"])
    params = dict(model.named_parameters())
    grads = [k for k in io if k.startswith(f"grad_{size}_")]
    assert len(grads) == 6
    for k in grads:
        assert_close(k, params[k[len(f"grad_{size}_"):]].grad, io[k])
    norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), max_norm=float("inf"))
    assert_scalar("gradnorm", norm, io[f"gradnorm_{size}"])
    assert all(p.grad is None for p in model.encoder.parameters()), "the encoder must stay frozen"


def test_soft_mining_reweights_gradient_not_value(io):
    """Dropping the per-pixel weights leaves the loss unchanged but moves the gradient (by 5-17 % here)."""
    model = model_from("official")
    x = io["x_224"]
    en, de, _ = model(x)
    cosine = torch.nn.functional.cosine_similarity
    plain = sum((1 - cosine(e.flatten(1), d.flatten(1))).mean() for e, d in zip(en, de)) / 2
    mined = inpformer.soft_mining_loss(en, de)
    assert torch.allclose(plain, mined)
    g_plain = torch.autograd.grad(plain, model.prototype_token, retain_graph=True)[0]
    g_mined = torch.autograd.grad(mined, model.prototype_token)[0]
    assert (g_plain - g_mined).norm() > 0.01 * g_mined.norm()


def test_position_interpolation_is_the_official_one(io):
    """size= interpolation (Hugging Face, timm) would give other features; ours matches at 224 and 518."""
    vit = model_from("official").encoder
    pos = vit.interpolate_pos_encoding(16, 16)
    grid = vit.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    by_size = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic")
    by_size = by_size.permute(0, 2, 3, 1).reshape(1, 256, -1)
    assert (pos[:, 1:] - by_size).abs().max() > 1e-2
    assert torch.equal(vit.interpolate_pos_encoding(37, 37), vit.pos_embed)


def test_real_dinov2_small_matches_reference():
    folder = "weights", "dinov2_vits14_imgfocus"
    vit = inpformer.load_backbone(shared(*folder, "model.safetensors")).eval()
    c = vit.config
    assert (c.embed_dim, c.depth, c.num_heads, c.num_register_tokens) == (384, 12, 6, 0)
    ref = load_file(shared(*folder, "reference.safetensors"))
    with torch.no_grad():
        for s in SIZES:
            layers = vit(ref[f"x_{s}"], list(range(2, 10)))
            assert_close(f"blocks_2_9_mean_{s}", torch.stack(layers, 1).mean(1), ref[f"blocks_2_9_mean_{s}"], 1e-4)
            assert_close(f"final_norm_{s}", vit(ref[f"x_{s}"]), ref[f"final_norm_{s}"], 1e-4)


def hub_state_dict():
    return load_file(shared(*TINY, "backbone_hub.safetensors"))


def features(vit, x):
    with torch.no_grad():
        return torch.stack(vit.eval()(x, [2, 9]))


def timm_names(sd):
    """A torch-hub DINOv2 state dict in timm's names: the class position folded into cls_token, no mask_token."""
    timm = {k: v for k, v in sd.items() if k not in ("mask_token", "register_tokens", "pos_embed", "cls_token")}
    timm["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
    timm["pos_embed"] = sd["pos_embed"][:, 1:].contiguous()
    timm["reg_token"] = sd["register_tokens"]
    return timm


def test_pth_namings_give_the_same_backbone_and_timm_names_are_left_to_line(io, tmp_path):
    sd = hub_state_dict()
    torch.save(sd, tmp_path / "hub.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pth")  # saved from a DDP wrapper
    ref = features(inpformer.load_backbone(shared(*TINY, "backbone_hub.safetensors")), io["x_224"])
    for f in ("hub.pth", "ddp.pth"):
        vit = inpformer.load_backbone(tmp_path / f)
        assert vit.config.num_register_tokens == 4 and vit.config.depth == 10
        assert torch.allclose(features(vit, io["x_224"]), ref, atol=1e-5), f
    save_file(timm_names(sd), tmp_path / "timm.safetensors")
    with pytest.raises(inpformer.TimmNames, match="timm.safetensors: timm's names"):  # line/weights.py reads them
        inpformer.load_backbone(tmp_path / "timm.safetensors")


@pytest.mark.parametrize("name", ["factory_small", "factory_large_noreg"])
def test_factories_round_trip_their_own_weights(name, tmp_path):
    vit = inpformer.vit_small() if name == "factory_small" else inpformer.vit_large(num_register_tokens=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = inpformer.load_backbone(tmp_path / "w.safetensors")
    assert loaded.config == vit.config


def expect_error(path, *words):
    with pytest.raises(inpformer.WeightsError) as e:
        inpformer.load_backbone(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_backbone_files_fail_with_one_line(tmp_path):
    sd = hub_state_dict()
    expect_error(tmp_path / "absent.safetensors", "no such file")
    raw = shared(*TINY, "backbone_hub.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    expect_error(tmp_path / "trunc.safetensors", "not a readable safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    expect_error(tmp_path / "junk.pth", "not a readable torch state dict")
    bad = dict(sd, **{"blocks.3.mlp.fc1.weight": torch.zeros(7, 128)})
    save_file(bad, tmp_path / "shape.safetensors")
    expect_error(tmp_path / "shape.safetensors", "blocks.3.mlp.fc1.weight", "(7, 128)", "(512, 128)")
    save_file({k: v for k, v in sd.items() if k != "blocks.5.ls2.gamma"}, tmp_path / "missing.safetensors")
    expect_error(tmp_path / "missing.safetensors", "missing key", "blocks.5.ls2.gamma")
    save_file(dict(sd, extra_head=torch.zeros(3)), tmp_path / "extra.safetensors")
    expect_error(tmp_path / "extra.safetensors", "unexpected key", "extra_head")
    save_file({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, tmp_path / "resnet.safetensors")
    expect_error(tmp_path / "resnet.safetensors", "not a DINOv2")


def test_project_checkpoint_round_trip(io, tmp_path):
    model = model_from("official")
    path = tmp_path / "ckpt.safetensors"
    inpformer.save_checkpoint(model, path, metadata={"data": "demo", "classes": ["a", "b"]})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"], "no temp file may be left"
    meta = inpformer.read_checkpoint_metadata(path)
    assert meta["classes"] == ["a", "b"] and meta["inpformer_config"]["inp_num"] == 6
    loaded = inpformer.load_model(path)
    assert loaded.config == model.config
    a, b = model.predict(io["x_224"]), loaded.predict(io["x_224"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_official_pth_and_mismatched_checkpoints(io, tmp_path):
    sd = load_file(shared(*TINY, "inpformer_official.safetensors"))
    torch.save(sd, tmp_path / "model.pth")
    model = inpformer.load_model(tmp_path / "model.pth")
    assert model.config.inp_num == 6 and model.config.vit.num_heads == 2
    assert_close("score", model.predict(io["x_224"])[1], io["score256_224"])

    with pytest.raises(inpformer.WeightsError, match="not an INP-Former checkpoint"):
        inpformer.load_model(shared(*TINY, "backbone_hub.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "decoder.3.attn.q.bias"}, tmp_path / "cut.safetensors")
    with pytest.raises(inpformer.WeightsError, match="decoder.3.attn.q.bias"):
        inpformer.load_model(tmp_path / "cut.safetensors")
    # a project checkpoint whose config says 8 INPs but whose tensors hold 6
    cfg = json.dumps(dict(json.loads(json.dumps(inpformer.asdict(model.config))), inp_num=8))
    save_file(sd, tmp_path / "mismatch.safetensors", metadata={"inpformer_config": cfg})
    with pytest.raises(inpformer.WeightsError, match=r"prototype_token.*\(6, 128\).*\(8, 128\)"):
        inpformer.load_model(tmp_path / "mismatch.safetensors")


def test_training_step_only_moves_the_heads(io):
    model = model_from("official").train()
    enc = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    before = model.loss(io["x_224"])
    before.backward()
    opt.step()
    assert not model.encoder.training
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc.items())
    assert model.loss(io["x_224"]).item() < before.item()


def test_zero_shot_map_is_the_inp_distance(io):
    model = model_from("official")
    maps, scores = model.predict_zero_shot(io["x_224"])
    assert maps.shape == (2, 256, 256) and scores.shape == (2,)
    _, fused = model.encode(io["x_224"])
    d = inpformer.inp_distance(fused, model.extract_inps(fused))
    assert_scalar("coherence", d.mean(), io["g_loss_224"])
    assert 0 <= maps.min() and maps.max() <= 2


def test_autocast_keeps_maps_scores_and_loss_in_fp32(io):
    """Under bf16 autocast (CUDA's default in train.py; CPU autocast exercises the same code) the network runs
    in bf16 but the loss, maps and scores are computed in fp32."""
    model = model_from("official")
    x = io["x_224"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps, scores = model.predict(x)
        zmaps, _ = model.predict_zero_shot(x)
        loss = model.train().loss(x)
    assert maps.dtype == zmaps.dtype == scores.dtype == loss.dtype == torch.float32
    assert (scores - io["score256_224"]).abs().max() < 0.02  # bf16 network, close to the fp32 reference
    assert abs(loss.item() - io["loss_224"].item()) < 0.01
    loss.backward()
    assert model.prototype_token.grad.dtype == torch.float32 and torch.isfinite(model.prototype_token.grad).all()


def test_checkpoint_written_by_an_earlier_main_still_loads_and_predicts_the_same():
    """tests/golden/main_2b6638c.safetensors: a tiny model saved by commit 2b6638c's save_checkpoint, with the
    maps (every 8th pixel), scores and loss that commit computed for the stored input."""
    golden = ROOT / "tests" / "golden"
    model = inpformer.load_model(golden / "main_2b6638c.safetensors")
    io = load_file(golden / "main_2b6638c_io.safetensors")
    assert model.config.inp_num == 3 and model.config.vit.num_register_tokens == 1
    meta = inpformer.read_checkpoint_metadata(golden / "main_2b6638c.safetensors")
    assert meta["classes"] == ["a", "b"] and meta["crop_size"] == 56 and meta["finished"] is True
    # its sizes were metadata then; they are the model's geometry now
    assert data.geometry_of(model.config.geometry) == data.ResizeCrop(meta["image_size"], 56)
    assert "metadata_version" not in meta  # version 1 had no number
    maps, scores = model.predict(io["x"])
    assert_close("maps", maps[:, ::8, ::8], io["maps_every_8th"], 1e-5)
    assert_close("scores", scores, io["scores"], 1e-5)
    assert_close("zero-shot scores", model.predict_zero_shot(io["x"])[1], io["zero_shot_scores"], 1e-5)
    assert_scalar("loss", model.train().loss(io["x"]), io["loss"])


def test_geometry_travels_in_the_config_and_metadata_reads_back_as_written(io, tmp_path):
    geometry = {"image_size": [252, 252], "crop_size": [224, 224]}
    model = inpformer.INPFormer(inpformer.load_backbone(shared(*TINY, "backbone_hub.safetensors")), geometry=geometry)
    meta = dict(metadata_version=2, data="mvtec", classes=["bottle"], total_iters=10, shots=None, note="mine")
    inpformer.save_checkpoint(model, tmp_path / "m.safetensors", meta)
    loaded = inpformer.load_model(tmp_path / "m.safetensors")
    assert loaded.config.geometry == geometry and loaded.config == model.config
    back = inpformer.read_checkpoint_metadata(tmp_path / "m.safetensors")
    assert {k: v for k, v in back.items() if k not in ("format", "inpformer_config")} == dict(
        metadata_version=2, data="mvtec", classes=["bottle"], total_iters=10, note="mine")  # None: not written
    # the authors' model.pth records nothing: the paper's geometry
    official = inpformer.load_model(shared(*TINY, "inpformer_official.safetensors"))
    assert official.config.geometry == inpformer.PAPER_GEOMETRY
    with pytest.raises(ValueError, match="--crop-size 100 must be a multiple of the model's patch size 14"):
        data.ResizeCrop(448, 100).check(14)


def test_precision_rule_is_fp32_unless_asked():
    cpu = torch.device("cpu")
    assert train.resolve_precision("auto", cpu) == "fp32" and train.resolve_precision(None, "cuda") == "fp32"
    assert train.resolve_precision("bf16", cpu) == "bf16" and train.resolve_precision("fp16", "cuda") == "fp16"
    with pytest.raises(ValueError, match="fp16 runs on CUDA only"):
        train.resolve_precision("fp16", cpu)
    assert set(train.PRECISIONS) == {"fp32", "bf16", "fp16"}


def test_a_model_cast_to_bf16_still_predicts(io):
    model = model_from("official").to(torch.bfloat16)
    maps, scores = model.predict(io["x_224"].to(torch.bfloat16))
    assert maps.dtype == scores.dtype == torch.float32
    assert (scores - io["score256_224"]).abs().max() <= 0.005 * io["score256_224"].abs().max()


def test_a_loaded_model_owns_its_weights_when_its_file_is_rewritten_in_place(tmp_path):
    """load_model builds on the meta device and takes the file's tensors as its parameters: they must be copies,
    not views of the mapped file, or a checkpoint rewritten in place (cp, rsync --inplace) would change them."""
    model = model_from("official")
    inpformer.save_checkpoint(model, tmp_path / "a.safetensors")
    loaded = inpformer.load_model(tmp_path / "a.safetensors")
    before = loaded.prototype_token.detach().clone()
    with torch.no_grad():
        model.prototype_token.mul_(-1)
    inpformer.save_checkpoint(model, tmp_path / "b.safetensors")
    with open(tmp_path / "a.safetensors", "r+b") as dst:
        dst.write((tmp_path / "b.safetensors").read_bytes())
    assert torch.equal(inpformer.load_model(tmp_path / "a.safetensors").prototype_token, -before)  # rewritten
    assert torch.equal(loaded.prototype_token, before) and not loaded.prototype_token.is_meta
    assert not loaded.encoder.pos_embed.requires_grad and loaded.prototype_token.requires_grad
