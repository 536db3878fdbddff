"""BYOM-LoRA: per task, a rank-q truncated SVD of its LoRA update, computed from the factors.

ΔW = B A with B: d_out×r, A: r×d_in. With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ,
so the SVD of the r×r core gives the SVD of ΔW: never form the d_out×d_in matrix.
"""
import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from .checks import check_choice, check_lora
from .registry import register
from .results import TaskExtras, recorded

StateDict = Mapping[str, Tensor]
LoraFactors = Mapping[str, tuple[Tensor, Tensor]]


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of B @ A from its thin factors: (U: d_out×k, S: k, V: d_in×k) with B A = U diag(S) Vᵀ."""
    dtype = torch.promote_types(B.dtype, torch.float32)
    q_b, r_b = torch.linalg.qr(B.to(dtype))  # (d_out, k), (k, k)
    q_a, r_a = torch.linalg.qr(A.to(dtype).T)  # (d_in, k), (k, k)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (k, k)
    return q_b @ u, s, q_a @ vh.T


def truncated(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets of B @ A."""
    U, S, V = factored_svd(B, A)
    return U[:, :rank], S[:rank], V[:, :rank]


@dataclass
class LoraTaskResult(TaskExtras):
    """A shared model plus, per task and matrix, rank-q factors (U_q, Σ_q, V_q) added to it."""

    kind: ClassVar[str] = "lora"
    merged: dict[str, Tensor]
    factors: list[dict[str, tuple[Tensor, Tensor, Tensor]]]  # factors[t][name] = (U, S, V)
    rank: int

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.factors)

    def task_state_dict(self, t: int) -> dict[str, Tensor]:
        """The full state dict for task t: merged + U_q Σ_q V_qᵀ on every adapted matrix."""
        self._check_task(t)
        out = {k: v.clone() for k, v in self.merged.items()}
        for name, (U, S, V) in self.factors[t].items():
            out[name] = out[name].add_(((U * S) @ V.T).to(out[name].dtype))
        return out

    def task_params(self, t: int) -> int:
        """q·(d_out + d_in + 1) per adapted matrix (q capped at min(d_out, d_in)), summed."""
        return sum(U.numel() + S.numel() + V.numel() for U, S, V in self.factors[t].values())

    def task_bytes(self, t: int) -> int:
        """Bytes of task t's factors."""
        return sum(U.nbytes + S.nbytes + V.nbytes for U, S, V in self.factors[t].values())

    def stored_shared(self) -> dict[str, dict[str, Tensor]]:
        """The shared files: {file stem: tensors}."""
        return {"shared": self.merged}

    def stored_task(self, t: int) -> dict[str, Tensor]:
        """The tensors of task t's file: `{name}::U`, `::S`, `::V` per adapted matrix."""
        return {f"{name}::{part}": x for name, usv in self.factors[t].items() for part, x in zip("USV", usv)}

    def stored_info(self) -> dict:
        """What the manifest records besides tensors: the rank q and the adapted matrices, in order."""
        return {"rank": self.rank, "adapted": list(self.factors[0]) if self.factors else []}

    @classmethod
    def from_stored(cls, shared: dict, tasks: list[dict], manifest: dict) -> "LoraTaskResult":
        """The result from its files' tensors and manifest (inverse of the `stored_*` methods)."""
        factors = [{name: tuple(task[f"{name}::{part}"] for part in "USV") for name in manifest["adapted"]}
                   for task in tasks]
        return cls(shared["shared"], factors, manifest["rank"])


def _merged_delta(lora: Sequence[LoraFactors], name: str, lam: float) -> tuple[Tensor, Tensor]:
    """Factors of λ Σ_t B_t A_t for one matrix: [B_1 … B_T] λ and [A_1; …; A_T]."""
    Bs = torch.cat([factors[name][0] for factors in lora], dim=1)  # (d_out, T·r)
    As = torch.cat([factors[name][1] for factors in lora], dim=0)  # (T·r, d_in)
    return Bs * lam, As


@register("byom_lora", inputs="lora")
def byom_lora(pretrained: StateDict, lora: Sequence[LoraFactors], rank: int = 4, base: str = "pretrained",
              lam: float = 0.3) -> LoraTaskResult:
    """BYOM-LoRA: keep a rank-q truncated SVD of each task's LoRA update (arXiv 2310.01886).

    Args:
        pretrained: θ0.
        lora: per task, {name: (B, A)} with ΔW = B @ A (B: d_out×r, A: r×d_in, scaling folded in);
            `name` is the key of the adapted matrix in `pretrained`.
        rank: q, the number of singular triplets kept per matrix, 1 <= q <= r.
        base: "pretrained" (θ0 + SVD_q(ΔW_t)) or "merged": θ* = θ0 + λ Σ ΔW_t, then
            θ* + SVD_q(ΔW_t − λ Σ ΔW_s) (merge-then-compress, the LoRA analogue of BYOM-FFT).
        lam: λ of the merged base (unused for base="pretrained").

    Returns:
        LoraTaskResult; each task stores q·(d_out + d_in + 1) numbers per adapted matrix.
    """
    check_lora(pretrained, lora, rank)
    check_choice(base, "base", ("pretrained", "merged"))
    if not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number, got {lam!r}")
    merged = {k: v.clone() for k, v in pretrained.items()}
    factors = [{} for _ in lora]
    for name in lora[0]:
        weight = pretrained[name]
        if base == "merged":
            B_sum, A_sum = _merged_delta(lora, name, lam)
            merged[name] = (weight + B_sum @ A_sum).to(weight.dtype)
        for t, task in enumerate(lora):
            B, A = task[name]
            if base == "merged":  # ΔW_t − λ Σ_s ΔW_s as one product of stacked factors
                B, A = torch.cat([B, -B_sum], dim=1), torch.cat([A, A_sum], dim=0)
            U, S, V = truncated(B, A, rank)
            factors[t][name] = (U.to(weight.dtype), S.to(weight.dtype), V.to(weight.dtype))
    return recorded(LoraTaskResult(merged, factors, rank), "byom_lora", rank=rank, base=base, lam=lam)
