"""EMR-Merging: elect a unified task vector, then a bit mask and one rescaler per task (arXiv 2405.17461).

    γ = sign(Σ_t v_t)                     elected sign (0 where the sum is 0)
    ε = max_t |v_t| over tasks with sign v_t = γ
    τ = γ·ε                               unified task vector
    M_t = [v_t·τ > 0]                     per-task mask
    s_t = Σ|v_t| / Σ|M_t·τ|               per-task rescaler (sums over all parameters)
    θ_t ≈ θ0 + s_t·M_t·τ

As written in DESIGN.md. The authors' code differs in two details: it elects −1 where the sum is
exactly 0, and sums per-tensor means (not all entries) in s_t.
"""
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from .checks import check_models
from .general import compute_dtype
from .registry import register
from .results import TaskExtras, recorded

StateDict = Mapping[str, Tensor]
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 bytes, 8 entries per byte (little-endian bit order), zero-padded."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)  # (bytes, 8)
    return (flat * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of `pack_bits`: the bool tensor of `shape`."""
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)  # (bytes, 8)
    return bits.reshape(-1)[: shape.numel()].reshape(shape)


@dataclass
class EMRResult(TaskExtras):
    """θ0, the unified task vector τ, and per task a packed bit mask and a rescaler."""

    kind: ClassVar[str] = "emr"
    pretrained: dict[str, Tensor]
    unified: dict[str, Tensor]  # τ
    masks: list[dict[str, Tensor]]  # masks[t][key]: packed bits of M_t
    scales: list[float]  # s_t, float32 values (stored as one float32 each)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.masks)

    @property
    def merged(self) -> dict[str, Tensor]:
        """The shared model θ0 + τ."""
        return {k: self.pretrained[k] + tau for k, tau in self.unified.items()}

    def task_state_dict(self, t: int) -> dict[str, Tensor]:
        """θ0 + s_t·M_t·τ."""
        self._check_task(t)
        out = {}
        for key, tau in self.unified.items():
            mask = unpack_bits(self.masks[t][key], tau.shape)
            out[key] = self.pretrained[key] + self.scales[t] * tau * mask
        return out

    def task_params(self, t: int) -> int:
        """Mask bits counted as 1/32 of a float32 parameter each (rounded up), plus the rescaler."""
        bits = sum(self.pretrained[k].numel() for k in self.unified)
        return -(-bits // 32) + 1

    def task_bytes(self, t: int) -> int:
        """Packed mask bytes plus one float32 rescaler."""
        return sum(m.nbytes for m in self.masks[t].values()) + 4

    def stored_shared(self) -> dict[str, dict[str, Tensor]]:
        """The shared files: θ0 and the unified task vector τ."""
        return {"pretrained": self.pretrained, "unified": self.unified}

    def stored_task(self, t: int) -> dict[str, Tensor]:
        """The tensors of task t's file: `{key}::mask` (packed bits) and `scale` (float32)."""
        masks = {f"{key}::mask": mask for key, mask in self.masks[t].items()}
        return {**masks, "scale": torch.tensor(self.scales[t], dtype=torch.float32)}

    def stored_info(self) -> dict:
        """What the manifest records besides tensors: nothing."""
        return {}

    @classmethod
    def from_stored(cls, shared: dict, tasks: list[dict], manifest: dict) -> "EMRResult":
        """The result from its files' tensors and manifest (inverse of the `stored_*` methods)."""
        masks = [{key: task[f"{key}::mask"] for key in manifest["keys"]} for task in tasks]
        return cls(shared["pretrained"], shared["unified"], masks, [float(task["scale"]) for task in tasks])


@register("emr")
def emr(pretrained: StateDict, finetuned: Sequence[StateDict]) -> EMRResult:
    """EMR-Merging: elect, mask & rescale (arXiv 2405.17461).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.

    Returns:
        EMRResult: `.merged` = θ0 + τ; `.task_state_dict(t)` = θ0 + s_t·M_t·τ; per task the extras
        are N mask bits and one scalar.
    """
    check_models(pretrained, finetuned)
    T = len(finetuned)
    unified, masks = {}, [{} for _ in range(T)]
    abs_v = torch.zeros(T, dtype=torch.float64)  # Σ|v_t|
    abs_masked = torch.zeros(T, dtype=torch.float64)  # Σ|M_t·τ|
    for key, base in pretrained.items():
        dtype = compute_dtype(base.dtype)
        vs = torch.stack([m[key].to(dtype) - base.to(dtype) for m in finetuned])  # (T, *shape)
        gamma = vs.sum(0).sign()
        agree = vs * gamma > 0  # (T, *shape): sign v_t = γ (never where γ = 0)
        tau = gamma * (vs.abs() * agree).amax(0)
        for t in range(T):
            mask = vs[t] * tau > 0
            masks[t][key] = pack_bits(mask)
            abs_v[t] += vs[t].abs().sum(dtype=torch.float64).cpu()
            abs_masked[t] += (tau.abs() * mask).sum(dtype=torch.float64).cpu()
        unified[key] = tau.to(base.dtype)
    scales = [float(a / m) if m > 0 else 0.0 for a, m in zip(abs_v, abs_masked, strict=True)]
    scales = torch.tensor(scales, dtype=torch.float32).tolist()  # one float32 per task, as stored and counted
    return recorded(EMRResult({k: v.clone() for k, v in pretrained.items()}, unified, masks, scales), "emr")
