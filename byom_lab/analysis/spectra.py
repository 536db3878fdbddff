"""Singular value spectra of LoRA updates ΔW = B A: what a rank-q truncation keeps, and what the factored SVD saves.

Eckart–Young–Mirsky: the best rank-q approximation of ΔW in Frobenius norm is its truncated SVD,
with error sqrt(Σ_{i>q} σ_i²). Everything here is read from the singular values of the thin
factors (`merging.factored_svd`), never from the dense d_out×d_in product, except the timings
that compare the two.
"""
import math
import re
import time
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..merging import factored_svd

LoraFactors = Mapping[str, tuple[Tensor, Tensor]]


def layer_kind(name: str) -> tuple[int, str]:
    """(block index, matrix kind) of a weight key: "transformer.resblocks.3.mlp.c_fc.weight" -> (3, "mlp.c_fc")."""
    match = re.search(r"resblocks\.(\d+)\.(.+?)(?:_weight|\.weight)?$", name)
    if not match:
        return -1, name
    return int(match.group(1)), match.group(2)


def singular_values(lora: Sequence[LoraFactors], tasks=None) -> pd.DataFrame:
    """One row per task, adapted matrix and index i = 1..r: σ_i, σ_i/σ_1, the energy share Σ_{j≤i} σ_j² / Σ σ²
    and the relative error of keeping the top i, sqrt(Σ_{j>i} σ_j² / Σ σ²) (summed from the tail: exactly 0 at i = r).

    Args:
        lora: per task, {name: (B, A)} with ΔW = B @ A.
        tasks: task names (default "task 0", "task 1", …).
    """
    tasks = list(tasks) if tasks is not None else [f"task {t}" for t in range(len(lora))]
    rows = []
    for task, factors in zip(tasks, lora, strict=True):
        for name, (B, A) in factors.items():
            s = factored_svd(B, A)[1].double().cpu()  # (r,), descending
            total = (s**2).sum().clamp_min(1e-300)
            energy = (s**2).cumsum(0) / total
            tail = torch.cat([(s**2).flip(0).cumsum(0).flip(0)[1:], s.new_zeros(1)])  # Σ_{j>i} σ_j², i = 1..r
            residual = (tail / total).sqrt()
            block, kind = layer_kind(name)
            for i, (sigma, share, err) in enumerate(zip(s.tolist(), energy.tolist(), residual.tolist()), start=1):
                rows.append({"task": task, "layer": name, "block": block, "kind": kind, "i": i, "sigma": sigma,
                             "normalized": sigma / s[0].item() if s[0] > 0 else 0.0, "energy": share, "residual": err})
    return pd.DataFrame(rows)


def truncation_error(spectra: pd.DataFrame) -> pd.DataFrame:
    """Relative error ‖ΔW − ΔW_q‖_F / ‖ΔW‖_F = sqrt(Σ_{i>q} σ_i² / Σ σ_i²) per task, matrix and q (Eckart–Young)."""
    out = spectra[["task", "layer", "kind", "i", "residual"]].rename(columns={"i": "rank", "residual": "relative_error"})
    return out.reset_index(drop=True)


def random_spectrum(d_out: int, d_in: int, rank: int, samples: int = 8, seed: int = 0) -> pd.DataFrame:
    """The null model: mean σ_i/σ_1 of B A with Gaussian factors of the same shape (no structure at all)."""
    gen = torch.Generator().manual_seed(seed)
    spectra = []
    for _ in range(samples):
        B, A = torch.randn(d_out, rank, generator=gen), torch.randn(rank, d_in, generator=gen)
        s = factored_svd(B, A)[1].double()
        spectra.append(s / s[0])
    mean = torch.stack(spectra).mean(0)
    return pd.DataFrame({"i": range(1, rank + 1), "normalized": mean.tolist()})


def decay_fit(errors: pd.DataFrame) -> pd.Series:
    """Is the error's fall with q exponential? Fit the mean log relative error over matrices for q < r.

    An exponential law err ≈ C·ρ^q is a straight line in (q, log err); a power law err ≈ C·q^(−α)
    is a straight line in (log q, log err). Returns the per-rank factor ρ, the exponent α, the R²
    of each straight line, and the measured factor of the last step before q = r (where the error
    of a rank-r matrix must reach 0, a finite-rank effect that neither law describes).
    """
    data = errors[errors["relative_error"] > 0]
    max_rank = int(errors["rank"].max())
    data = data[data["rank"] < max_rank]
    curve = np.log(data["relative_error"]).groupby(data["rank"]).mean()  # mean log error per q
    if len(curve) < 3:
        raise ValueError("need at least 3 ranks below the LoRA rank to fit a decay")
    q, y = curve.index.to_numpy(dtype=float), curve.to_numpy()

    def line(x):
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (slope * x + intercept)
        return slope, intercept, 1.0 - residual.var() / y.var()

    slope_e, intercept_e, r2_e = line(q)
    slope_p, _, r2_p = line(np.log(q))
    steps = np.exp(np.diff(y))  # measured factor per extra rank
    return pd.Series({"per_rank_factor": math.exp(slope_e), "log_intercept": intercept_e, "r2_exponential": r2_e,
                      "power_exponent": -slope_p, "r2_power": r2_p, "min_step_factor": float(steps.min()),
                      "max_step_factor": float(steps.max()), "last_step_factor": float(steps[-1]),
                      "ranks_to_halve": math.log(0.5) / slope_e if slope_e < 0 else math.inf})


def component_truncation_error(B: Tensor, A: Tensor, rank: int) -> float:
    """Relative error of the obvious alternative to the SVD: keep the q LoRA components b_i a_iᵀ of largest ‖b_i‖‖a_i‖."""
    B, A = B.double(), A.double()
    weight = B.norm(dim=0) * A.norm(dim=1)  # (r,)
    keep = weight.topk(rank).indices
    full = B @ A  # dense: small suites only
    approx = B[:, keep] @ A[keep]
    total = full.norm()
    return float((full - approx).norm() / total) if total > 0 else 0.0


def eckart_young_check(lora: Sequence[LoraFactors], ranks: Sequence[int], tasks=None) -> pd.DataFrame:
    """Per task, matrix and q: the SVD's relative error (from σ), the dense error of U_q Σ_q V_qᵀ, and the component-keeping error."""
    tasks = list(tasks) if tasks is not None else [f"task {t}" for t in range(len(lora))]
    rows = []
    for task, factors in zip(tasks, lora, strict=True):
        for name, (B, A) in factors.items():
            U, S, V = factored_svd(B.double(), A.double())
            full = B.double() @ A.double()
            total = full.norm()
            for q in ranks:
                dense = float((full - (U[:, :q] * S[:q]) @ V[:, :q].T).norm() / total)
                from_sigma = float((S[q:] ** 2).sum().sqrt() / total)
                rows.append({"task": task, "layer": name, "rank": q, "svd_error": from_sigma, "dense_error": dense,
                             "component_error": component_truncation_error(B, A, q)})
    return pd.DataFrame(rows)


def _best_seconds(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if isinstance(out, tuple) and out and out[0].is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def svd_timing(B: Tensor, A: Tensor, repeats: int = 3) -> pd.Series:
    """One matrix: best-of-`repeats` seconds of torch.linalg.svd(B @ A) vs factored_svd(B, A), and their agreement.

    The factored SVD takes microseconds, so its best is taken over 5·`repeats` calls (timer noise on a busy
    machine would otherwise dominate it); the dense SVD over `repeats`. On the CPU both run on one thread, so
    the timings compare the two algorithms rather than how a shared machine schedules threads.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    B, A = B.float(), A.float()
    threads = torch.get_num_threads()
    if not B.is_cuda:
        torch.set_num_threads(1)
    try:
        torch.linalg.svd(B @ A, full_matrices=False), factored_svd(B, A)  # warm-up: lazy initialisation is not the method's cost
        dense = _best_seconds(lambda: torch.linalg.svd(B @ A, full_matrices=False), repeats)
        factored = _best_seconds(lambda: factored_svd(B, A), 5 * repeats)
    finally:
        torch.set_num_threads(threads)
    r = min(B.shape[1], *B.shape, *A.shape)
    s_dense = torch.linalg.svdvals(B @ A)[:r]
    s_fact = factored_svd(B, A)[1][:r]
    return pd.Series({"d_out": B.shape[0], "d_in": A.shape[1], "r": B.shape[1], "dense_seconds": dense,
                      "factored_seconds": factored, "speedup": dense / factored if factored > 0 else math.inf,
                      "sigma_difference": float((s_dense - s_fact).abs().max() / s_dense[0].clamp_min(1e-30))})


def svd_timings(lora: LoraFactors, extra_shapes=(), repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """`svd_timing` for each distinct matrix shape of one task's LoRA, plus Gaussian factors of `extra_shapes` (d_out, d_in)."""
    rows, seen = [], set()
    for name, (B, A) in lora.items():
        shape = (B.shape[0], A.shape[1])
        if shape in seen:
            continue
        seen.add(shape)
        rows.append({"matrix": layer_kind(name)[1], **svd_timing(B, A, repeats)})
    gen = torch.Generator().manual_seed(seed)
    r = next(iter(lora.values()))[0].shape[1]
    for d_out, d_in in extra_shapes:
        B, A = torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen)
        rows.append({"matrix": f"random {d_out}×{d_in}", **svd_timing(B, A, repeats)})
    df = pd.DataFrame(rows)
    return df.astype({"d_out": int, "d_in": int, "r": int})


def storage_by_rank(pretrained: Mapping[str, Tensor], lora: LoraFactors, ranks: Sequence[int]) -> pd.DataFrame:
    """Numbers stored per task: BYOM-LoRA at each q (Σ q(d_out + d_in + 1)), the LoRA factors, the full model."""
    lora_params = sum(B.numel() + A.numel() for B, A in lora.values())
    full = sum(t.numel() for t in pretrained.values())
    rows = []
    for q in ranks:
        byom = sum(min(q, B.shape[1]) * (B.shape[0] + A.shape[1] + 1) for B, A in lora.values())
        rows.append({"rank": q, "byom_lora_params": byom, "lora_params": lora_params, "full_model_params": full,
                     "share_of_lora": byom / lora_params, "share_of_full": byom / full})
    return pd.DataFrame(rows)
