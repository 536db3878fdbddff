"""TALL masks and Consensus merging: one bit per parameter per task picks a task's share of τ (arXiv 2405.07813).

    τ     = Σ_t v_t  (base "task_arithmetic"), or TIES's trimmed, sign-elected sum (base "ties", merge "sum")
    m_t   = [ |v_t| ≥ λ_t·|τ − v_t| ]          TALL mask: entries where task t explains τ better than the rest
    θ_t  ≈ θ0 + α·(m_t ⊙ τ)                    α = 1, as nik-dim/tall_masks evaluates its masks
    Consensus:  θ* = θ0 + λ·(τ ⊙ [Σ_t m_t ≥ k])   drops entries useful to fewer than k tasks (k = 2)

λ_t ∈ {0.2, …, 0.6} is chosen per task on validation (byom_lab.adaptation.protocol.select_tall_lambdas),
λ of Consensus on validation too. The reference code compares with a strict `>`; this module uses
`≥` as DESIGN.md writes it (the two differ only where both sides are equal, e.g. both 0).
"""
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from .checks import check_choice, check_density, check_models
from .emr import pack_bits, unpack_bits
from .family import task_arithmetic, ties
from .registry import register
from .results import TaskExtras, recorded

StateDict = Mapping[str, Tensor]
BASES = ("task_arithmetic", "ties")
LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)  # the reference's grid of λ_t


def multitask_vector(pretrained: StateDict, finetuned: Sequence[StateDict], base: str = "task_arithmetic",
                     density: float = 0.2) -> dict[str, Tensor]:
    """τ: the sum of the task vectors, or TIES's trimmed, sign-elected sum of them (merge "sum")."""
    check_choice(base, "base", BASES)
    zero = {k: torch.zeros_like(v) for k, v in pretrained.items()}
    vectors = [{k: m[k] - pretrained[k] for k in pretrained} for m in finetuned]  # v_t
    if base == "ties":  # TIES on (0, v_t) returns its merged vector τ itself, not θ0 + τ
        return ties(zero, vectors, density=density, lam=1.0, merge="sum")
    return task_arithmetic(zero, vectors, lam=1.0)


def tall_mask(v: Tensor, tau: Tensor, lam: float) -> Tensor:
    """m = [|v| ≥ λ·|τ − v|] for one tensor of one task."""
    return v.abs() >= lam * (tau - v).abs()


def _lambdas(lams, num_tasks: int) -> list[float]:
    lams = [lams] * num_tasks if isinstance(lams, (int, float)) else list(lams)
    if len(lams) != num_tasks:
        raise ValueError(f"got {len(lams)} TALL λ_t for {num_tasks} tasks")
    for lam in lams:
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam >= 0:
            raise ValueError(f"TALL λ_t must be numbers >= 0, got {lam!r}")
    return [float(lam) for lam in lams]


def _check_alpha(alpha, name="alpha"):
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
        raise ValueError(f"{name} must be a number >= 0 (it scales τ), got {alpha!r}")
    return float(alpha)


@dataclass
class TallMaskResult(TaskExtras):
    """θ0, the multi-task vector τ, and per task a packed bit mask m_t: θ_t ≈ θ0 + α·(m_t ⊙ τ)."""

    kind: ClassVar[str] = "tall"
    pretrained: dict[str, Tensor]
    tau: dict[str, Tensor]
    masks: list[dict[str, Tensor]]  # masks[t][key]: packed bits of m_t
    alpha: float = 1.0

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.masks)

    @property
    def merged(self) -> dict[str, Tensor]:
        """The shared model θ0 + α·τ."""
        return {k: self.pretrained[k] + self.alpha * tau for k, tau in self.tau.items()}

    def mask(self, t: int) -> dict[str, Tensor]:
        """Task t's mask m_t as bool tensors."""
        self._check_task(t)
        return {k: unpack_bits(self.masks[t][k], tau.shape) for k, tau in self.tau.items()}

    def task_state_dict(self, t: int) -> dict[str, Tensor]:
        """θ0 + α·(m_t ⊙ τ)."""
        return {k: self.pretrained[k] + self.alpha * self.tau[k] * m for k, m in self.mask(t).items()}

    def task_params(self, t: int) -> int:
        """Mask bits counted as 1/32 of a float32 parameter each (rounded up), as EMR's masks are."""
        return -(-sum(v.numel() for v in self.tau.values()) // 32)

    def task_bytes(self, t: int) -> int:
        """Packed mask bytes: one bit per parameter."""
        return sum(m.nbytes for m in self.masks[t].values())

    def stored_shared(self) -> dict[str, dict[str, Tensor]]:
        """The shared files: θ0 and τ."""
        return {"pretrained": self.pretrained, "tau": self.tau}

    def stored_task(self, t: int) -> dict[str, Tensor]:
        """The tensors of task t's file: `{key}::mask` (packed bits)."""
        return {f"{key}::mask": mask for key, mask in self.masks[t].items()}

    def stored_info(self) -> dict:
        """What the manifest records besides tensors: α."""
        return {"alpha": self.alpha}

    @classmethod
    def from_stored(cls, shared: dict, tasks: list[dict], manifest: dict) -> "TallMaskResult":
        """The result from its files' tensors and manifest (inverse of the `stored_*` methods)."""
        masks = [{key: task[f"{key}::mask"] for key in manifest["keys"]} for task in tasks]
        return cls(shared["pretrained"], shared["tau"], masks, float(manifest["alpha"]))


def _masks(pretrained, finetuned, tau, lams) -> list[dict[str, Tensor]]:
    """Unpacked bool masks m_t per task and key."""
    return [{k: tall_mask(m[k] - pretrained[k], tau[k], lam) for k in pretrained} for m, lam in zip(finetuned, lams)]


@register("tall_masks")
def tall_masks(pretrained: StateDict, finetuned: Sequence[StateDict], lams=0.4, base: str = "task_arithmetic",
               density: float = 0.2, alpha: float = 1.0) -> TallMaskResult:
    """TALL masks: θ_t ≈ θ0 + α·(m_t ⊙ τ), m_t = [|v_t| ≥ λ_t|τ − v_t|], one bit per parameter per task (arXiv 2405.07813).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        lams: λ_t, one number for every task or one per task (choose them on validation, grid 0.2…0.6).
        base: how τ is built: "task_arithmetic" (Σ v_t) or "ties" (trimmed to `density`, sign-elected, summed).
        density: TIES's trim density (base "ties" only; the reference's k = 20%).
        alpha: α, the scale of the masked τ (1 in the reference code).

    Returns:
        TallMaskResult: `.task_state_dict(t)`, `.mask(t)`, `.nbytes()` = one bit per parameter.
    """
    check_models(pretrained, finetuned)
    lams, alpha = _lambdas(lams, len(finetuned)), _check_alpha(alpha)
    density = check_density(density)
    tau = multitask_vector(pretrained, finetuned, base, density)
    packed = [{k: pack_bits(m) for k, m in task.items()} for task in _masks(pretrained, finetuned, tau, lams)]
    result = TallMaskResult({k: v.clone() for k, v in pretrained.items()}, tau, packed, alpha)
    return recorded(result, "tall_masks", lams=lams, base=base, density=density, alpha=alpha)


@register("consensus")
def consensus(pretrained: StateDict, finetuned: Sequence[StateDict], lams=0.4, k: int = 2, lam: float = 1.0,
              base: str = "task_arithmetic", density: float = 0.2) -> dict[str, Tensor]:
    """Consensus merging: θ0 + λ·(τ ⊙ [Σ_t m_t ≥ k]), the TALL masks m_t deciding what is kept (arXiv 2405.07813).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        lams: the TALL masks' λ_t (one number or one per task).
        k: keep an entry active in at least k masks (2 drops "selfish" and "catastrophic" weights).
        lam: λ, the scale of the kept τ (choose it on validation).
        base: "task_arithmetic" or "ties", as for `tall_masks`.
        density: TIES's trim density (base "ties" only).
    """
    check_models(pretrained, finetuned)
    lams, lam = _lambdas(lams, len(finetuned)), _check_alpha(lam, "lam")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be an integer >= 0 (the number of masks an entry needs), got {k!r}")
    tau = multitask_vector(pretrained, finetuned, base, check_density(density))
    masks = _masks(pretrained, finetuned, tau, lams)
    return {key: pretrained[key] + lam * tau[key] * (sum(m[key].int() for m in masks) >= k) for key in pretrained}
