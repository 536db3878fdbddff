"""Sparsifying and scaling task vectors, measured: energy kept, each task's share of a merge, DARE's draws, sweeps.

TIES keeps the largest magnitudes of each task vector (arXiv 2306.01708); DARE drops entries at
random with probability p and rescales the survivors by 1/(1 − p) (arXiv 2311.03099). These
functions measure what either throws away, how much of each task a merge carries (which sets the
λ it needs), and what it costs in accuracy.
"""
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from .. import merging
from ..evaluation import evaluate
from ..merging.select import num_kept
from ..selection import TIES_LAMBDA_GRID, select_lambda

StateDict = Mapping[str, Tensor]


def _check_values(values, name: str) -> list:
    values = list(values)
    if not values:
        raise ValueError(f"empty sweep: give at least one value for {name}")
    return values


def energy_kept(vectors: Sequence[StateDict], densities, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Share of each vector's energy ‖v‖² held by its top-`density` magnitudes (ranked over the whole vector).

    Returns one row per (task, density): task, density, m_percent, energy in [0, 1].
    """
    densities = _check_values(densities, "densities")
    names = list(names) if names is not None else [str(t) for t in range(len(vectors))]
    rows = []
    for name, v in zip(names, vectors, strict=True):
        sq = torch.cat([t.float().reshape(-1) for t in v.values()]).square().sort(descending=True).values  # (N,)
        cum = sq.double().cumsum(0)
        for d in densities:
            k = num_kept(d, sq.numel())
            rows.append({"task": name, "density": d, "m_percent": 100 * d,
                         "energy": float(cum[k - 1] / cum[-1]) if cum[-1] > 0 else 1.0})
    return pd.DataFrame(rows)


def gaussian_energy(densities) -> pd.DataFrame:
    """The same share for a vector of i.i.d. Gaussian entries: top-m% of |x| keeps m + 2zφ(z), z = Φ⁻¹(1 − m/2)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    rows = []
    for d in _check_values(densities, "densities"):
        z = normal.icdf(torch.tensor(1 - d / 2, dtype=torch.float64))
        energy = d + 2 * float(z * normal.log_prob(z).exp()) if d < 1 else 1.0
        rows.append({"density": d, "m_percent": 100 * d, "energy": energy})
    return pd.DataFrame(rows)


def differing_entries(a: StateDict, b: StateDict, atol: float = 1e-6) -> int:
    """How many entries of two state dicts with the same keys differ by more than `atol` (e.g. at top-k ties)."""
    return sum(int(((a[k].double() - b[k].double()).abs() > atol).sum()) for k in a)


def update_norm(pretrained: StateDict, merged: StateDict) -> float:
    """‖θ* − θ0‖₂ over every entry: how far a merge moves the pretrained model."""
    return float(sum((merged[k].double() - pretrained[k].double()).square().sum() for k in pretrained) ** 0.5)


def own_coefficients(pretrained: StateDict, finetuned: Sequence[StateDict], merged: StateDict,
                     names: Sequence[str] | None = None) -> pd.Series:
    """Per task, c_t = ⟨θ* − θ0, v_t⟩ / ‖v_t‖²: how much of its own task vector the merged update carries.

    Task arithmetic at λ = 1 gives c_t = 1 + Σ_{s≠t} ⟨v_s, v_t⟩ / ‖v_t‖² (about 1 for near-orthogonal
    task vectors); trimming, the sign election and TIES's mean all lower it.
    """
    dot = torch.zeros(len(finetuned), dtype=torch.float64)
    sq = torch.zeros(len(finetuned), dtype=torch.float64)
    for k in pretrained:
        base = pretrained[k].double().reshape(-1)
        step = merged[k].double().reshape(-1) - base  # (n,)
        v = torch.stack([ft[k].double().reshape(-1) for ft in finetuned]) - base  # (T, n)
        dot += v @ step
        sq += v.square().sum(1)
    names = list(names) if names is not None else list(range(len(finetuned)))
    return pd.Series((dot / sq).tolist(), index=names, name="c")


def dare_mean_error(pretrained: StateDict, finetuned: StateDict, drop: float, draws=(1, 4, 16, 64, 256),
                    seed: int = 0) -> pd.DataFrame:
    """DARE is unbiased: the mean of n independent draws of ṽ = v ⊙ keep / (1 − p) approaches v.

    Draws ṽ with `merging.dare` (one task, λ = 1, seeds seed, seed + 1, …) over the given state dicts
    (pass a few tensors to keep it quick). Returns one row per (n, estimator): the relative error
    ‖mean − v‖ / ‖v‖ of the rescaled draws ("rescaled", DARE) and of the same draws without the
    1/(1 − p) rescale ("dropped only", whose mean tends to (1 − p)·v), and the error an unbiased
    estimator with DARE's variance p/(1 − p)·v² per entry has: √(p / ((1 − p)·n)).
    """
    draws = sorted(_check_values(draws, "draws"))
    if not 0 < drop < 1:
        raise ValueError(f"drop must be in (0, 1), got {drop}")
    v = torch.cat([(finetuned[k].double() - pretrained[k].double()).reshape(-1) for k in pretrained])  # (n,)
    norm = float(v.norm())
    total, rows = torch.zeros_like(v), []
    for i in range(draws[-1]):
        merged = merging.dare(pretrained, [finetuned], drop=drop, seed=seed + i, lam=1.0)
        total += torch.cat([(merged[k].double() - pretrained[k].double()).reshape(-1) for k in pretrained])
        n = i + 1
        if n in draws:
            mean = total / n
            rows += [{"draws": n, "estimator": "rescaled (DARE)", "relative_error": float((mean - v).norm()) / norm},
                     {"draws": n, "estimator": "dropped only", "relative_error": float((mean * (1 - drop) - v).norm()) / norm},
                     {"draws": n, "estimator": "predicted √(p/((1−p)n))", "relative_error": (drop / ((1 - drop) * n)) ** 0.5}]
    return pd.DataFrame(rows)


def drop_sweep(suite, drops, lam: float, base: str = "task_arithmetic", seed: int = 0, split: str = "test",
               **base_kwargs) -> pd.DataFrame:
    """DARE at each drop probability p (then `base` at scale λ): mean accuracy of the merged model per p.

    Returns one row per p: drop, accuracy, normalized_accuracy (means over the suite's tasks).
    """
    rows = []
    for p in _check_values(drops, "drops"):
        merged = merging.dare(suite.pretrained, suite.finetuned, drop=p, base=base, seed=seed, lam=lam, **base_kwargs)
        df = evaluate(suite, merged, split)
        rows.append({"drop": p, "accuracy": df["accuracy"].mean(), "normalized_accuracy": df["normalized_accuracy"].mean()})
    return pd.DataFrame(rows)


def density_sweep(suite, densities, grid=TIES_LAMBDA_GRID, split: str = "test", **ties_kwargs) -> pd.DataFrame:
    """TIES at each density m with its own λ chosen on validation (`select_lambda`), scored on `split`.

    Returns one row per density: density, m_percent, lam, val_accuracy (at that λ), accuracy and
    normalized_accuracy (means over the suite's tasks on `split`).
    """
    rows = []
    for d in _check_values(densities, "densities"):
        lam, scores = select_lambda(suite, "ties", grid=grid, density=d, **ties_kwargs)
        df = evaluate(suite, merging.ties(suite.pretrained, suite.finetuned, density=d, lam=lam, **ties_kwargs), split)
        rows.append({"density": d, "m_percent": 100 * d, "lam": lam, "val_accuracy": scores[lam],
                     "accuracy": df["accuracy"].mean(), "normalized_accuracy": df["normalized_accuracy"].mean()})
    return pd.DataFrame(rows)
