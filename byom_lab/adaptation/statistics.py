"""Statistics of each fine-tuned model on its task's training images: diagonal Fisher and input Grams, cached.

    Fisher (arXiv 2111.09832, FusionBench's estimator): per batch b of 32 images,
        g_b = ∇_θ Σ_i Σ_c sqrt(p_ic)·log p_ic      p = softmax of the model's own logits, detached (no labels)
        F   = Σ_b g_b² / N                          N = 256 images
    Gram (arXiv 2212.09849): per linear weight W applied to inputs X (rows = tokens, every token of
        every image),  G = XᵀX / N_rows.  The attention's in-projection sees the block's normed
        tokens, the out-projection the attention output, c_fc the normed tokens, c_proj the GELU
        output, and the image projection `proj` the pooled class token.

Each statistic is computed once per (model weights, head, images, settings) and kept in the cache
directory under a digest of all of them (byom_lab.cache, byom_lab.memo).
"""
import json
import math
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import cache, forward, memo
from ..evaluation import eval_device
from ..merging.statistics import ModelStatistics
from .weights import check_positive, features

VERSION = 1  # bump when what a statistic computes changes
N_IMAGES, BATCH_SIZE = 256, 32


def train_images(suite, t: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised first n training images of task t, their raw uint8 pixels for the cache key)."""
    raw = suite.data[suite.tasks[t]]["train"][0][:n]
    x = suite.inputs(t, "train")[0][:n]
    return (suite.normalize(x) if x.dtype == torch.uint8 else x), raw


def layer_inputs(visual, sd: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input rows of every linear weight of an open_clip ViT tower under `sd`, all tokens of all images.

    The same computation as `byom_lab.forward.image_features`, written out so each input is seen.
    """
    heads = visual.transformer.resblocks[0].attn.num_heads
    act = forward._activation(visual)
    n, w = images.shape[0], sd["conv1.weight"]
    width, p = w.shape[0], w.shape[2]
    patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(n, -1, 3 * p * p)
    x = torch.cat([sd["class_embedding"].expand(n, 1, width), patches @ w.reshape(width, -1).T], 1)
    x = F.layer_norm(x + sd["positional_embedding"], (width,), sd["ln_pre.weight"], sd["ln_pre.bias"])  # (n, L, width)
    seen = {}
    for i in range(len(visual.transformer.resblocks)):
        pre = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"])
        seen[pre + "attn.in_proj_weight"] = h
        qkv = F.linear(h, sd[pre + "attn.in_proj_weight"], sd[pre + "attn.in_proj_bias"])
        q, k, v = qkv.view(n, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # (n, heads, L, d) each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, width)
        seen[pre + "attn.out_proj.weight"] = out
        x = x + F.linear(out, sd[pre + "attn.out_proj.weight"], sd[pre + "attn.out_proj.bias"])
        h = F.layer_norm(x, (width,), sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"])
        seen[pre + "mlp.c_fc.weight"] = h
        a = act(F.linear(h, sd[pre + "mlp.c_fc.weight"], sd[pre + "mlp.c_fc.bias"]))
        seen[pre + "mlp.c_proj.weight"] = a
        x = x + F.linear(a, sd[pre + "mlp.c_proj.weight"], sd[pre + "mlp.c_proj.bias"])
    pooled = F.layer_norm(x[:, 0], (width,), sd["ln_post.weight"], sd["ln_post.bias"])
    if "proj" in sd:
        seen["proj"] = pooled
    return {k: v.reshape(-1, v.shape[-1]) for k, v in seen.items()}


def diagonal_fisher(logits, params: dict, batches) -> dict[str, torch.Tensor]:
    """F = Σ_b (∇_θ Σ_i Σ_c sqrt(p_ic)·log p_ic)² / N over `batches`, p = softmax(logits(params, x)) detached.

    `logits(params, x)` maps a batch to (batch, classes); N counts the images of all batches.
    """
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    count = 0
    for x in batches:
        out = logits(params, x)
        objective = (out.softmax(-1).detach().sqrt() * out.log_softmax(-1)).sum()  # Σ_b Σ_c sqrt(p)·log p
        grads = torch.autograd.grad(objective, list(params.values()), allow_unused=True)
        for acc, g in zip(total.values(), grads):
            if g is not None:
                acc.add_(g.detach() ** 2)
        count += len(x)
    return {k: v / count for k, v in total.items()}


def _fisher(suite, t: int, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    device = eval_device()
    params = {k: v.to(device).detach().requires_grad_(True) for k, v in suite.finetuned[t].items()}
    head, visual = suite.logit_scale * suite.heads[t].to(device), suite.visual.to(device)
    batches = (x[i:i + batch_size].to(device) for i in range(0, len(x), batch_size))
    fisher = diagonal_fisher(lambda p, xb: features(visual, p, xb) @ head.T, params, batches)
    return {k: v.cpu() for k, v in fisher.items()}


@torch.no_grad()
def _grams(suite, t: int, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    device = eval_device()
    if not forward.supports(suite.visual):
        raise ValueError("Gram statistics need an open_clip ViT tower laid out as byom_lab.forward assumes")
    sd = {k: v.to(device) for k, v in suite.finetuned[t].items()}
    sums, rows = {}, {}
    for i in range(0, len(x), batch_size):
        for key, inputs in layer_inputs(suite.visual.to(device), sd, x[i:i + batch_size].to(device)).items():
            inputs = inputs.double()
            sums[key] = sums.get(key, 0) + inputs.T @ inputs  # (d_in, d_in)
            rows[key] = rows.get(key, 0) + inputs.shape[0]
    return {k: (s / rows[k]).float().cpu() for k, s in sums.items()}


def _statistics(kind: str, suite, t: int, n: int, batch_size: int) -> ModelStatistics:
    """Task t's statistic of `kind`, computed once per content and read back from the cache afterwards."""
    check_positive(n, "images")
    check_positive(batch_size, "batch_size")
    x, raw = train_images(suite, t, n)
    model = memo.state_digest(suite.finetuned[t])
    key = {"kind": kind, "version": VERSION, "model": model, "head": memo.tensors_digest(suite.heads[t]),
           "logit_scale": suite.logit_scale, "data": memo.tensors_digest(raw),
           "normalize": getattr(suite.normalize, "__qualname__", repr(suite.normalize)), "n": len(x),
           "batch_size": batch_size}
    info = {"split": "train", "images": len(x), "batch_size": batch_size, "task": suite.tasks[t]}

    def build(tmp):
        start = time.perf_counter()
        tensors = (_fisher if kind == "fisher" else _grams)(suite, t, x, batch_size)
        meta = {"model": model, "info": json.dumps({**info, "seconds": round(time.perf_counter() - start, 3)})}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)

    def load(path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        return ModelStatistics(kind, load_file(str(path)), meta["model"], len(x), json.loads(meta["info"]))

    return cache.cached(cache.entry(f"statistics-{kind}", key) / f"{kind}.safetensors", build, load)


def fisher_statistics(suite, images: int = N_IMAGES, batch_size: int = BATCH_SIZE) -> list[ModelStatistics]:
    """Per task, the diagonal Fisher of its fine-tuned model on its first `images` training images (cached)."""
    return [_statistics("fisher", suite, t, images, batch_size) for t in range(len(suite.tasks))]


def gram_statistics(suite, images: int = N_IMAGES, batch_size: int = BATCH_SIZE) -> list[ModelStatistics]:
    """Per task, the input Gram of every linear weight of its fine-tuned model on its first `images` training images (cached)."""
    return [_statistics("gram", suite, t, images, batch_size) for t in range(len(suite.tasks))]


def statistics_seconds(stats: list[ModelStatistics]) -> float:
    """Seconds the statistics took when they were computed (recorded with them in the cache)."""
    return math.fsum(s.info.get("seconds", 0.0) for s in stats)
