"""line/cpu.py: bf16 on a CPU (attention as plain products, a few images a pass), equal to the fused kernels and
to fp32 within bf16's rounding; the core's fp32 path takes none of it."""
import copy

import torch
from safetensors.torch import load_file

import evaluate
import inpformer
import line.cpu
import train
from conftest import shared

TINY = "fixtures", "official_tiny"


def assert_close(name, got, ref, rel=1e-4):
    got, ref = got.detach().float(), ref.float().reshape(got.shape)
    err = (got - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"{name}: max|diff| {err:.3g} vs max|ref| {ref.abs().max():.3g}"


def official_model():
    return inpformer.load_model(shared(*TINY, "inpformer_official.safetensors"))


def test_cpu_half_precision_attention_equals_the_fused_kernel_and_average_equals_a_stacked_mean():
    """line.cpu.attention runs bf16 inference on a CPU as products 128 query rows at a time (the tokens here are
    not a multiple of 128, so the last chunk is short); fp32 and anything autograd records take the fused kernel.
    Both against softmax attention written out in float64."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 300, 16).unbind(0)
    weights = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 4, dim=-1)
    exact = (weights @ v.double()).transpose(1, 2).reshape(2, 300, 64)
    assert_close("fp32", inpformer.attention(q, k, v), exact, 1e-5)
    assert torch.equal(line.cpu.attention(q, k, v), inpformer.attention(q, k, v))
    half = [t.bfloat16() for t in (q, k, v)]
    with torch.no_grad():
        chunked = line.cpu.attention(*half)
    assert chunked.dtype == torch.bfloat16 and chunked.shape == (2, 300, 64)
    assert_close("bf16, chunked", chunked, exact, 0.02)
    recorded = line.cpu.attention(*[t.clone().requires_grad_() for t in half])
    assert recorded.grad_fn is not None and not torch.equal(recorded.detach(), chunked)  # the fused kernel
    assert_close("bf16, fused", recorded, exact, 0.02)
    layers = list(torch.randn(4, 2, 300, 16).unbind(0))
    assert torch.equal(inpformer.average(layers), torch.stack(layers, dim=1).mean(dim=1))
    assert torch.equal(inpformer.average(layers[:1]), layers[0]) and inpformer.average(layers[:1]) is not layers[0]
    half_layers = [t.bfloat16() for t in layers]
    mean = inpformer.average(half_layers)
    assert mean.dtype == torch.bfloat16
    assert_close("bf16 mean", mean, torch.stack(half_layers, dim=1).mean(dim=1), 2 ** -8)


def test_on_a_cpu_inference_runs_a_few_images_a_pass_with_the_same_maps(monkeypatch):
    """line.cpu.raw_maps splits a CPU batch into passes of images_per_pass images (memory the allocator can reuse);
    maps and scores, reconstruction and zero-shot, are those of one pass over the whole batch, to round-off, in
    order."""
    with torch.device("meta"):  # only the arithmetic of images_per_pass: no weights needed
        base = inpformer.INPFormer(inpformer.vit_base())
    assert line.cpu.images_per_pass(base, torch.zeros(16, 3, 392, 392)) == 2  # ViT-B at 392 px: 789 tokens
    assert line.cpu.images_per_pass(base, torch.zeros(16, 3, 392, 392, device="meta")) == 16  # not a CPU: one pass
    io = load_file(shared(*TINY, "io.safetensors"))
    model = official_model()
    x = torch.cat([io["x_224"], io["x_224"].flip(-1), io["x_224"].flip(-2)])  # 6 different images
    assert line.cpu.images_per_pass(model, x) >= 6  # a tiny model: one pass
    whole = model.predict(x), model.predict_zero_shot(x)
    monkeypatch.setattr(line.cpu, "images_per_pass", lambda model, x: 4)  # passes of 4 and 2
    split = [inpformer.score_maps(line.cpu.raw_maps(model, x, zero_shot)) for zero_shot in (False, True)]
    for kind, (maps, scores), (ref_maps, ref_scores) in zip(("reconstruction", "zero-shot"), split, whole):
        assert_close(f"{kind} maps", maps, ref_maps, 1e-5)
        assert_close(f"{kind} scores", scores, ref_scores, 1e-5)
    assert (whole[0][1][:2] - whole[0][1][2:4]).abs().max() > 1e-3  # the images differ: order would show


def test_bf16_cpu_scoring_agrees_with_fp32():
    """--precision bf16 on the CPU (the whole model cast once, maps and scores in fp32): on the official
    fixture model the maps stay within 1% of their maximum and the scores within 0.5% (measured: 0.18% and
    0.03%)."""
    io = load_file(shared(*TINY, "io.safetensors"))
    fp32 = inpformer.load_model(shared(*TINY, "inpformer_official.safetensors"))
    bf16 = evaluate.ready_model(fp32, "cpu", "bf16")
    assert bf16.prototype_token.dtype == torch.bfloat16 and fp32.prototype_token.dtype == torch.float32  # a copy
    for size in (224, 392):
        m32, s32 = evaluate.predict_maps(fp32, io[f"x_{size}"])
        m16, s16 = evaluate.predict_maps(bf16, io[f"x_{size}"])
        assert m16.dtype == s16.dtype == torch.float32
        assert 0 < (m16 - m32).abs().max() <= 0.01 * m32.abs().max()
        assert (s16 - s32).abs().max() <= 0.005 * s32.abs().max()


def test_scoring_on_a_cpu_takes_the_cpu_paths_without_touching_the_callers_model(model, monkeypatch):
    """bf16 on a CPU: the scored model's blocks attend through line/cpu.py (a copy's: the caller's model keeps its
    own, also when it already is bf16), and a model that has them is scored as it is; images go through the
    network a few a pass (line.cpu.raw_maps); train.py's bf16 encoder takes the same attention. fp32 is the core's
    path: the whole batch in one pass (measured no slower on a CPU)."""
    bf16 = evaluate.ready_model(model, "cpu", "bf16")
    assert line.cpu.uses_cpu_attention(bf16.encoder) and not line.cpu.uses_cpu_attention(model.encoder)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    ready = evaluate.ready_model(cast, "cpu", "bf16")
    assert ready is not cast and not line.cpu.uses_cpu_attention(cast.encoder)
    assert evaluate.ready_model(ready, "cpu", "bf16") is ready
    encoder = train.step_encoder(model, torch.device("cpu"), torch.bfloat16)
    assert line.cpu.uses_cpu_attention(encoder) and not line.cpu.uses_cpu_attention(model.encoder)
    monkeypatch.setattr(line.cpu, "images_per_pass", lambda model, x: 2)
    for scored, want in ((ready, [2, 2, 1]), (model, [5])):
        passes = []
        monkeypatch.setattr(scored, "raw_maps", lambda x, zero_shot=False, passes=passes: passes.append(len(x))
                            or torch.zeros(len(x), 1, *x.shape[-2:]))
        maps, scores = evaluate.predict_maps(scored, torch.randn(5, 3, 112, 112))
        assert passes == want and maps.shape == (5, 256, 256)
