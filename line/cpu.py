"""CPU speed paths: inference a few images a pass, so that activations stay memory the allocator reuses, and
bf16 attention without autograd (inference, and the frozen encoder in training) as plain matrix products, which
use the CPU's bf16 units where its fused kernel does not.
"""
import torch

import evaluate
import inpformer

# glibc reuses freed blocks below 32 MiB; a larger one comes fresh from the kernel on every allocation, zeroed
# page by page, and at 16 images of 392 px that cost ViT-B a quarter of its fp32 speed and a third of its bf16
# speed. So a pass holds as many images as keep the largest activation (the MLP's hidden layer) below this, and
# at least one (a large frame may still exceed it). Other allocators are merely not hurt.
CPU_PASS_BYTES = 24 * 2**20


def images_per_pass(model, x) -> int:
    """How many images of x (B, 3, h, w) the network runs at once: all of them, except on a CPU (see
    CPU_PASS_BYTES; counted in fp32 for bf16 too: half the bytes, but measured no faster with more images)."""
    if x.device.type != "cpu":
        return len(x)
    h, w = model.token_grid(x)
    tokens = h * w + 1 + model.encoder.config.num_register_tokens
    hidden = int(model.encoder.config.embed_dim * model.encoder.config.mlp_ratio)
    return max(1, CPU_PASS_BYTES // (tokens * hidden * 4))


@torch.no_grad()
def raw_maps(model, x, zero_shot=False):
    """model.raw_maps(x, zero_shot), a few images a pass on a CPU: the same maps to round-off, the memory
    reused. An ONNX export keeps its batch symbolic: one pass."""
    per_pass = images_per_pass(model, x)
    if torch.onnx.is_in_onnx_export() or len(x) <= per_pass:
        return model.raw_maps(x, zero_shot)
    return torch.cat([model.raw_maps(part, zero_shot) for part in x.split(per_pass)])


def attention(q, k, v):
    """inpformer.attention, except on a CPU in bf16 or fp16 without autograd: plain products, 128 query rows at a
    time, written straight into the (B, N, h * d) layout. The CPU flash kernel computes half precision no faster
    than fp32, while products use the bf16 matrix units, and 128 rows of scores stay in cache. The keys and
    values are made contiguous once: as views of the qkv product, every chunk's product would copy them again."""
    if q.device.type != "cpu" or q.dtype == torch.float32 or torch.is_grad_enabled():
        return inpformer.attention(q, k, v)
    B, h, N, d = q.shape
    out = q.new_empty(B, N, h, d)
    q = q * d ** -0.5
    kt, v = k.transpose(-2, -1).contiguous(), v.contiguous()
    for i in range(0, N, 128):
        out[:, i:i + 128] = (torch.softmax(q[:, :, i:i + 128] @ kt, dim=-1) @ v).transpose(1, 2)
    return out.view(B, N, h * d)


def use_cpu_attention(encoder):
    """The encoder's blocks attend with `attention` above where it is faster (evaluate.half_on_cpu: on a CPU, in
    half precision); else nothing changes."""
    if evaluate.half_on_cpu(encoder):
        for block in encoder.blocks:
            block.attention = attention
    return encoder


def uses_cpu_attention(encoder) -> bool:
    return all(block.attention is attention for block in encoder.blocks)
