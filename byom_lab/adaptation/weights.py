"""What test-time adaptation trains through: θ(λ) = θ0 + Σ_t λ_t,l v_t,l built functionally, and its features.

One `TaskVectorStack` holds θ0 and the task vectors stacked per tensor (T, *shape); `weights(λ)`
returns a new state dict whose tensors are differentiable functions of λ, fed straight to the
functional forward of the image tower. No model is copied or loaded per step. The adaptation
images are the suite's preprocessed test images, kept in memory (`Suite.inputs`).
"""
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import forward
from ..merging import top
from ..model import encode_images

PARTS = ("all", "first_half")  # which test images a test-time method adapts on


def features(visual, state_dict: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """L2-normalised image features under `state_dict`: the fast functional forward when it supports the tower."""
    if forward.supports(visual):
        return F.normalize(forward.image_features(visual, state_dict, images), dim=-1)
    return encode_images(visual, images, state_dict)


def ties_vectors(vectors: Sequence[Mapping[str, Tensor]], density: float = 0.2) -> list[dict[str, Tensor]]:
    """AdaMerging++'s vectors: v̂_t = top(v_t, density) (global), then v̂_t·[sign v̂_t = γ], γ = sign(Σ v̂_t) (+1 at 0)."""
    trimmed = [top(v, density, "global")[0] for v in vectors]
    out = [{} for _ in trimmed]
    for key in trimmed[0]:
        stacked = torch.stack([v[key] for v in trimmed])  # (T, *shape)
        gamma = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
        kept = stacked * (torch.sign(stacked) == gamma)
        for t in range(len(out)):
            out[t][key] = kept[t]
    return out


class TaskVectorStack:
    """θ0 and the task vectors stacked per tensor; `weights(λ)` is θ(λ) for λ of shape (tensors, tasks)."""

    def __init__(self, pretrained: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]], device=None):
        self.keys = list(pretrained)
        self.base = {k: v.detach().to(device) for k, v in pretrained.items()}
        self.stacked = {k: torch.stack([v[k] for v in vectors]).to(device) for k in self.keys}  # (T, *shape)
        self.num_tasks = len(vectors)

    def weights(self, lam: Tensor) -> dict[str, Tensor]:
        """θ0 + Σ_t λ[l, t]·v_t for every tensor l (a differentiable function of λ)."""
        if lam.shape != (len(self.keys), self.num_tasks):
            raise ValueError(f"λ must have shape (tensors, tasks) = {(len(self.keys), self.num_tasks)}, "
                             f"got {tuple(lam.shape)}")
        return {k: self.base[k] + torch.tensordot(lam[i].to(self.base[k].dtype), self.stacked[k], dims=1)
                for i, k in enumerate(self.keys)}


def adaptation_images(suite, t: int, part: str = "all") -> Tensor:
    """Task t's preprocessed test images a test-time method may adapt on: all of them or the first half."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(map(repr, PARTS))}, got {part!r}")
    x = suite.inputs(t, "test")[0]
    x = x[: len(x) // 2] if part == "first_half" else x
    return suite.normalize(x) if x.dtype == torch.uint8 else x


def check_positive(value, name: str) -> None:
    """Raise unless `value` is a positive integer (steps, epochs, batch sizes)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
