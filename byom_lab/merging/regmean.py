"""RegMean: merge each linear layer by the least-squares fit of every model's outputs (arXiv 2212.09849).

For a linear layer y = x W (W in `in × out` orientation) and model t with inputs X_t (rows =
tokens), minimising Σ_t ‖X_t W − X_t W_t‖² gives

    G_t = X_tᵀ X_t / N_t                      Gram of the layer's inputs (byom_lab.adaptation.statistics)
    G̃_t = α·G_t + (1 − α)·diag(G_t)           off-diagonal entries × α (α = 1: the exact regression)
    W*  = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t

α = 0.95 is FusionBench's setting for CLIP (0.1 its generic default). Every tensor without a Gram
(biases, norms, embeddings, the patch convolution) is averaged.
"""
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .checks import check_models
from .registry import register
from .statistics import check_statistics

StateDict = Mapping[str, Tensor]


def inputs_first(weight: Tensor, gram: Tensor) -> bool:
    """Whether `weight` is applied as x @ W (in × out, open_clip's `proj`) rather than x @ Wᵀ (nn.Linear).

    A square matrix is taken as nn.Linear's (out × in).
    """
    d_in = gram.shape[0]
    return weight.shape[0] == d_in and weight.shape[1] != d_in


def _check_gram(gram: Tensor, weight: Tensor, where: str) -> None:
    d_in = gram.shape[0] if gram.ndim == 2 else -1
    if gram.ndim != 2 or gram.shape[1] != d_in or d_in not in tuple(weight.shape)[:2] or weight.ndim != 2:
        raise ValueError(f"{where} has shape {tuple(gram.shape)}, which is no input Gram of a weight shaped "
                         f"{tuple(weight.shape)}: statistics from another model?")


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α·G + (1 − α)·diag(G): off-diagonal entries multiplied by α, the diagonal kept."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


@register("regmean", inputs="statistics")
def regmean(pretrained: StateDict, finetuned: Sequence[StateDict], grams: Sequence, alpha: float = 0.95) -> dict[str, Tensor]:
    """RegMean: W* = (Σ G̃_t)⁻¹ Σ G̃_t W_t per linear layer, other tensors averaged (arXiv 2212.09849).

    Args:
        pretrained: θ0 (gives the keys and shapes).
        finetuned: [θ_t], one state dict per task.
        grams: one statistic per model, in task order: a `ModelStatistics` of kind "gram" (checked
            to come from that model) or a dict {weight key: (d_in, d_in) Gram of that layer's inputs}.
            Every model must have a Gram for the same weights.
        alpha: α in [0, 1], the factor on the Grams' off-diagonal entries.

    Returns:
        The merged state dict θ*.
    """
    check_models(pretrained, finetuned)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1] (the factor on the Grams' off-diagonal entries), got {alpha!r}")
    found = check_statistics(grams, finetuned, "gram", "grams")
    layers = list(found[0])
    for t, g in enumerate(found):
        for key in [k for k in layers if k not in g] + [k for k in g if k not in layers]:
            raise ValueError(f"grams[{t}] {'lacks' if key in layers else 'has an extra'} Gram for {key!r}: "
                             f"a statistic is missing (every model needs the same layers)")
        for key in layers:
            if key not in pretrained:
                raise ValueError(f"grams[{t}] has a Gram for {key!r}, which is no key of pretrained: "
                                 f"statistics from another model?")
            _check_gram(g[key], pretrained[key], f"grams[{t}][{key!r}]")
    merged = {}
    for key, base in pretrained.items():
        if key not in layers:
            merged[key] = torch.stack([m[key].double() for m in finetuned]).mean(0).to(base.dtype)
            continue
        flip = not inputs_first(base, found[0][key])  # nn.Linear stores W as out × in
        G = [shrink_off_diagonal(g[key].double(), alpha) for g in found]  # T × (d_in, d_in)
        W = [(m[key].double().T if flip else m[key].double()) for m in finetuned]  # T × (d_in, d_out)
        rhs = sum(g @ w for g, w in zip(G, W))  # (d_in, d_out)
        try:
            solved = torch.linalg.solve(sum(G), rhs)  # (d_in, d_out)
        except torch.linalg.LinAlgError:
            raise ValueError(f"the summed Gram of {key!r} is singular: too few input rows for its width, "
                             f"or α = 1 on rank-deficient inputs; use more images or α < 1") from None
        merged[key] = (solved.T if flip else solved).contiguous().to(base.dtype)
    return merged
