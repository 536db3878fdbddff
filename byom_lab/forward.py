"""A functional forward of open_clip's ViT image tower that computes only what the class token needs.

Evaluation classifies the pooled class token, so the last block needs queries, attention output
and MLP for that one token only (keys and values still for every token): about a tenth of the
forward's work is skipped. The other blocks run as open_clip's do, with the attention through
`scaled_dot_product_attention` instead of `nn.MultiheadAttention`'s fused path. Features agree
with open_clip's own forward to float rounding (tests/test_evaluation.py checks it, and that the
predicted classes are the same).

`supports(visual)` says whether a tower has the layout this forward assumes (class-token pooling,
no attention pooling, no LayerScale, GELU or QuickGELU); `byom_lab.model.encode_images` falls back
to `torch.func.functional_call` for any other tower.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def _activation(visual):
    """GELU or QuickGELU (x·σ(1.702x), OpenAI's CLIP) as a function, or None if the tower uses another one."""
    act = type(visual.transformer.resblocks[0].mlp.gelu).__name__
    if act == "GELU" and getattr(visual.transformer.resblocks[0].mlp.gelu, "approximate", "none") == "none":
        return F.gelu
    if act == "QuickGELU":
        return lambda x: x * torch.sigmoid(1.702 * x)
    return None


def supports(visual) -> bool:
    """Whether `visual` is an open_clip VisionTransformer laid out as this forward assumes."""
    try:
        blocks = visual.transformer.resblocks
        plain = (visual.attn_pool is None and visual.pool_type == "tok" and not visual.final_ln_after_pool
                 and visual.conv1.bias is None and visual.transformer.batch_first and not visual.output_tokens
                 and type(visual.patch_dropout).__name__ == "Identity" and type(visual.ln_pre).__name__ != "Identity")
        blocks_plain = all(type(b.ls_1).__name__ == "Identity" and type(b.ls_2).__name__ == "Identity"
                           and not hasattr(b, "ln_1_kv") and b.attn.batch_first and b.attn._qkv_same_embed_dim
                           for b in blocks)
        return bool(plain and blocks_plain and _activation(visual) is not None)
    except AttributeError:
        return False


def _linear(x: Tensor, sd: dict, name: str, lora: dict, rows: slice = slice(None)) -> Tensor:
    """x @ W[rows]ᵀ + b[rows] for the layer `name` (weight `name.weight`/`name_weight`), plus its LoRA path B(A x) if any."""
    weight = name + ("_weight" if name.endswith("in_proj") else ".weight")
    bias = name + ("_bias" if name.endswith("in_proj") else ".bias")
    out = torch.addmm(sd[bias][rows], x, sd[weight][rows].T)
    if weight in lora:  # low-rank update kept factored: never forms W + B A, and needs no gradient of W
        B, A = lora[weight]  # (d_out, r), (r, d_in), scaling folded into B
        out = out + (x @ A.T) @ B[rows].T
    return out


def _attention(x: Tensor, sd: dict, pre: str, heads: int, batch: int, cls_only: bool, lora: dict) -> Tensor:
    """Self-attention of one block on normed tokens x (batch·L, width); queries of the class token only if `cls_only`."""
    width = x.shape[1]
    tokens = x.shape[0] // batch
    if cls_only:
        q = _linear(x.view(batch, tokens, width)[:, 0], sd, pre + "attn.in_proj", lora, slice(0, width))
        kv = _linear(x, sd, pre + "attn.in_proj", lora, slice(width, None)).view(batch, tokens, 2, heads, -1)
        q = q.view(batch, 1, heads, -1).transpose(1, 2)  # (batch, heads, 1, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (batch, heads, L, d)
    else:
        qkv = _linear(x, sd, pre + "attn.in_proj", lora).view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (batch, heads, L, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, L_q, d)
    out = out.transpose(1, 2).reshape(-1, width)  # (batch·L_q, width)
    return _linear(out, sd, pre + "attn.out_proj", lora)


def image_features(visual, sd: dict, images: Tensor, lora: dict = None) -> Tensor:
    """Pooled, projected (not normalised) image features of `images` (n, 3, H, W) under the weights `sd`.

    `lora` optionally maps weight names of `sd` to LoRA factors (B, A), scaling folded into B: the
    layer then computes W x + B (A x).
    """
    lora = lora or {}
    act = _activation(visual)
    heads = visual.transformer.resblocks[0].attn.num_heads
    n = images.shape[0]
    w = sd["conv1.weight"]  # (width, 3, p, p)
    width, p = w.shape[0], w.shape[2]
    patches = images.unfold(2, p, p).unfold(3, p, p)  # (n, 3, g, g, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 3 * p * p)  # (n, g², 3p²)
    x = patches @ w.reshape(width, -1).T  # (n, g², width)
    x = torch.cat([sd["class_embedding"].to(x.dtype).expand(n, 1, width), x], dim=1) + sd["positional_embedding"]
    x = F.layer_norm(x, (width,), sd["ln_pre.weight"], sd["ln_pre.bias"]).reshape(-1, width)  # (n·L, width)
    last = len(visual.transformer.resblocks) - 1
    for i in range(last + 1):
        pre = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"])
        if i == last:  # only the class token goes on: (n, width)
            x = x.view(n, -1, width)[:, 0]
        x = _attention(h, sd, pre, heads, n, i == last, lora) + x
        h = F.layer_norm(x, (width,), sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"])
        x = _linear(act(_linear(h, sd, pre + "mlp.c_fc", lora)), sd, pre + "mlp.c_proj", lora) + x
    pooled = F.layer_norm(x, (width,), sd["ln_post.weight"], sd["ln_post.bias"])
    return pooled @ sd["proj"] if "proj" in sd and sd["proj"] is not None else pooled
