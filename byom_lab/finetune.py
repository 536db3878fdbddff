"""Fine-tuning of the image tower against a frozen zero-shot head: full and LoRA."""
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import forward
from .model import encode_images, preprocess

LORA_SUFFIXES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run (full or LoRA)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-4
    lora_lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    weight_decay: float = 0.1
    warmup_frac: float = 0.1
    seed: int = 0


def lora_targets(state_dict: dict) -> list:
    """Names of the attention and MLP weight matrices that LoRA adapts."""
    return [k for k in state_dict if k.endswith(LORA_SUFFIXES) and state_dict[k].ndim == 2]


def _fused(params) -> bool | None:
    """Use AdamW's fused kernel where torch has one for these tensors (CPU and CUDA float32): one pass per step."""
    return True if all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params) else None


def _features(visual, x, weights, lora=None):
    """L2-normalised image features: the functional forward when it supports the tower, open_clip's otherwise."""
    if forward.supports(visual):
        return torch.nn.functional.normalize(forward.image_features(visual, weights, x, lora), dim=-1)
    if lora:
        weights = {**weights, **{k: weights[k] + b @ a for k, (b, a) in lora.items()}}
    return encode_images(visual, x, weights)


def num_steps(n_images: int, cfg: FinetuneConfig) -> int:
    """Optimizer steps of one fine-tune on `n_images` images."""
    return cfg.epochs * math.ceil(n_images / cfg.batch_size)


def _loop(params, logits, images, labels, cfg, lr, desc, bar=None):
    """AdamW with warmup + cosine over epochs of shuffled mini-batches, one `bar` step per batch; returns nothing."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=_fused(params))
    n = len(labels)
    steps = num_steps(n, cfg)
    warm = max(1, int(cfg.warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    own = bar is None
    bar = tqdm(total=steps, desc=desc, leave=False) if own else bar
    bar.set_postfix_str(desc, refresh=False)
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss = torch.nn.functional.cross_entropy(logits(preprocess(images[idx])), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    finally:
        if own:
            bar.close()


def finetune_full(visual, pretrained: dict, head, logit_scale, images, labels, cfg: FinetuneConfig, desc="full",
                  bar=None) -> dict:
    """Fine-tune every image-tower weight; returns the new state dict (`bar`: a shared progress bar)."""
    torch.manual_seed(cfg.seed)
    params = {k: v.clone().requires_grad_(True) for k, v in pretrained.items()}

    def logits(x):
        return logit_scale * _features(visual, x, params) @ head.T

    _loop(list(params.values()), logits, images, labels, cfg, cfg.lr, desc, bar)
    return {k: v.detach() for k, v in params.items()}


def finetune_lora(visual, pretrained: dict, head, logit_scale, images, labels, cfg: FinetuneConfig, desc="lora",
                  bar=None) -> dict:
    """LoRA fine-tuning of the attention/MLP matrices; returns {name: (B, A)} with scaling folded into B."""
    g = torch.Generator().manual_seed(cfg.seed)
    r, scale = cfg.lora_rank, cfg.lora_alpha / cfg.lora_rank
    factors = {}
    for k in lora_targets(pretrained):
        d_out, d_in = pretrained[k].shape
        a = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).requires_grad_(True)
        factors[k] = (torch.zeros(d_out, r, requires_grad=True), a)

    def logits(x):
        lora = {k: (scale * b, a) for k, (b, a) in factors.items()}
        return logit_scale * _features(visual, x, pretrained, lora) @ head.T

    _loop([p for ba in factors.values() for p in ba], logits, images, labels, cfg, cfg.lora_lr, desc, bar)
    return {k: ((scale * b).detach(), a.detach()) for k, (b, a) in factors.items()}


def apply_lora(pretrained: dict, lora: dict) -> dict:
    """θ0 + B @ A for every adapted matrix (a new dict)."""
    out = dict(pretrained)
    for k, (b, a) in lora.items():
        if k not in pretrained:
            raise KeyError(f"LoRA key {k!r} is not a weight of the pretrained model")
        out[k] = pretrained[k] + b @ a
    return out
