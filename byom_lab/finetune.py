"""Fine-tuning of the image tower against a frozen zero-shot head: full and LoRA."""
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

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


def _loop(params, forward, images, labels, cfg, lr, desc):
    """AdamW with warmup + cosine over epochs of shuffled mini-batches; returns nothing."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    n = len(labels)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    warm = max(1, int(cfg.warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    with tqdm(total=steps, desc=desc, leave=False) as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss = torch.nn.functional.cross_entropy(forward(preprocess(images[idx])), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)


def finetune_full(visual, pretrained: dict, head, logit_scale, images, labels, cfg: FinetuneConfig, desc="full") -> dict:
    """Fine-tune every image-tower weight; returns the new state dict."""
    torch.manual_seed(cfg.seed)
    params = {k: v.clone().requires_grad_(True) for k, v in pretrained.items()}

    def forward(x):
        return logit_scale * encode_images(visual, x, params) @ head.T

    _loop(list(params.values()), forward, images, labels, cfg, cfg.lr, desc)
    return {k: v.detach() for k, v in params.items()}


def finetune_lora(visual, pretrained: dict, head, logit_scale, images, labels, cfg: FinetuneConfig, desc="lora") -> dict:
    """LoRA fine-tuning of the attention/MLP matrices; returns {name: (B, A)} with scaling folded into B."""
    g = torch.Generator().manual_seed(cfg.seed)
    r, scale = cfg.lora_rank, cfg.lora_alpha / cfg.lora_rank
    factors = {}
    for k in lora_targets(pretrained):
        d_out, d_in = pretrained[k].shape
        a = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).requires_grad_(True)
        factors[k] = (torch.zeros(d_out, r, requires_grad=True), a)

    def forward(x):
        weights = dict(pretrained)
        for k, (b, a) in factors.items():
            weights[k] = pretrained[k] + scale * (b @ a)
        return logit_scale * encode_images(visual, x, weights) @ head.T

    _loop([p for ba in factors.values() for p in ba], forward, images, labels, cfg, cfg.lora_lr, desc)
    return {k: ((scale * b).detach(), a.detach()) for k, (b, a) in factors.items()}


def apply_lora(pretrained: dict, lora: dict) -> dict:
    """θ0 + B @ A for every adapted matrix (a new dict)."""
    out = dict(pretrained)
    for k, (b, a) in lora.items():
        if k not in pretrained:
            raise KeyError(f"LoRA key {k!r} is not a weight of the pretrained model")
        out[k] = pretrained[k] + b @ a
    return out
