"""Fisher merging: a per-parameter weighted average, weights from each model's diagonal Fisher (arXiv 2111.09832).

    F_t      diagonal Fisher of θ_t (byom_lab.adaptation.statistics.fisher_statistics)
    w_t      = (1/(‖F_t‖₂ + ε)) / Σ_s 1/(‖F_s‖₂ + ε)       one scalar per model (FusionBench's normalisation)
    θ*       = Σ_t w_t (F_t + ε) θ_t / Σ_t w_t (F_t + ε)    elementwise, ε = 1e-6

A parameter no model is sensitive to (F_t = 0 for all t) gets the w-weighted average of the θ_t.
"""
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .checks import check_models
from .general import compute_dtype
from .registry import register
from .statistics import check_statistics

StateDict = Mapping[str, Tensor]


def _fisher_tensors(fishers: Sequence, pretrained: StateDict, finetuned: Sequence[StateDict]) -> list[Mapping[str, Tensor]]:
    """The checked Fisher dicts: one per model, every key of θ0, same shapes, non-negative."""
    found = check_statistics(fishers, finetuned, "fisher", "fishers")
    for t, f in enumerate(found):
        for key, weight in pretrained.items():
            if key not in f:
                raise ValueError(f"fishers[{t}] has no statistic for {key!r}: the Fisher is missing a parameter")
            if f[key].shape != weight.shape:
                raise ValueError(f"fishers[{t}][{key!r}] has shape {tuple(f[key].shape)}, the model's is "
                                 f"{tuple(weight.shape)}: statistics from another model?")
            if bool((f[key] < 0).any()):
                raise ValueError(f"fishers[{t}][{key!r}] has negative entries; a diagonal Fisher is >= 0")
    return found


@register("fisher", inputs="statistics")
def fisher(pretrained: StateDict, finetuned: Sequence[StateDict], fishers: Sequence, eps: float = 1e-6) -> dict[str, Tensor]:
    """Fisher merging: θ* = Σ w_t (F_t+ε) θ_t / Σ w_t (F_t+ε), w_t ∝ 1/(‖F_t‖₂+ε) (arXiv 2111.09832).

    Args:
        pretrained: θ0 (gives the keys and shapes; the merge itself averages the θ_t).
        finetuned: [θ_t], one state dict per task.
        fishers: one diagonal Fisher per model, in task order: a `ModelStatistics` of kind "fisher"
            (checked to come from that model) or a dict {key: tensor shaped like the weight}.
        eps: ε, added to every Fisher entry and to the norms (FusionBench's minimal_fisher_weight).

    Returns:
        The merged state dict θ*.
    """
    check_models(pretrained, finetuned)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    found = _fisher_tensors(fishers, pretrained, finetuned)
    norms = torch.tensor([sum(float(f[k].double().pow(2).sum()) for k in pretrained) ** 0.5 for f in found],
                         dtype=torch.float64)  # (T,) ‖F_t‖₂ over every parameter
    w = 1.0 / (norms + eps)
    w = w / w.sum()  # (T,)
    merged = {}
    for key, base in pretrained.items():
        dtype = compute_dtype(base.dtype)
        shape = (-1,) + (1,) * base.ndim
        F = torch.stack([f[key].to(dtype) for f in found]) + eps  # (T, *shape)
        theta = torch.stack([m[key].to(dtype) for m in finetuned])  # (T, *shape)
        weight = w.to(dtype).view(shape) * F
        merged[key] = ((weight * theta).sum(0) / weight.sum(0)).to(base.dtype)
    return merged
