"""Task vectors and their sum (Ilharco et al., arXiv 2212.04089): norms, how they add, accuracy per task
along λ, and how adding one task's vector changes another task's accuracy.

v_t = θ_t − θ0; task arithmetic θ(λ) = θ0 + λ Σ_t v_t. For vectors at right angles the squared norms
add, ‖Σ_t v_t‖² = Σ_t ‖v_t‖², so T vectors of equal norm n sum to norm √T·n, not T·n.
"""
import pandas as pd
import torch

from .. import merging
from ..evaluation import accuracy, evaluate


def _flat(vector: dict) -> torch.Tensor:
    """A state dict's entries as one float64 vector (keys in sorted order, so every vector lines up)."""
    return torch.cat([vector[k].reshape(-1).double() for k in sorted(vector)])  # (N,)


def vector_norms(vectors, names) -> pd.DataFrame:
    """One row per task: task, norm ‖v_t‖ (float64 over every entry)."""
    return pd.DataFrame({"task": list(names), "norm": [float(_flat(v).norm()) for v in vectors]})


def partial_sum_norms(vectors) -> pd.DataFrame:
    """For k = 1..T: ‖Σ_{t≤k} v_t‖ (norm_of_sum), √(Σ_{t≤k} ‖v_t‖²) (root_sum_of_squares), Σ_{t≤k} ‖v_t‖ (sum_of_norms)."""
    rows, total, squares, norms = [], None, 0.0, 0.0
    for k, v in enumerate(vectors, start=1):
        flat = _flat(v)
        total = flat if total is None else total + flat
        n = float(flat.norm())
        squares, norms = squares + n * n, norms + n
        rows.append({"k": k, "norm_of_sum": float(total.norm()), "root_sum_of_squares": squares ** 0.5,
                     "sum_of_norms": norms})
    return pd.DataFrame(rows)


def lambda_sweep(suite, grid, split: str = "val", method: str = "task_arithmetic", **kwargs) -> pd.DataFrame:
    """Accuracy of every task under merging.<method>(…, lam=λ) for each λ of `grid`: rows lam, task, accuracy, normalized_accuracy.

    The models are those `selection.select_lambda` builds for the same grid, so its evaluations are reused (memoised).
    """
    fn = merging.get_method(method)
    frames = []
    for lam in [float(g) for g in grid]:
        df = evaluate(suite, fn(suite.pretrained, suite.finetuned, lam=lam, **kwargs), split)
        frames.append(df.assign(lam=lam))
    if not frames:
        raise ValueError("empty λ grid")
    return pd.concat(frames, ignore_index=True)[["lam", "task", "accuracy", "normalized_accuracy"]]


def best_lambda_per_task(sweep: pd.DataFrame) -> pd.DataFrame:
    """Each task's own best λ in a `lambda_sweep` (the smallest on ties): task, lam, accuracy, normalized_accuracy."""
    order = sweep.sort_values(["task", "accuracy", "lam"], ascending=[True, False, True])
    best = order.groupby("task", sort=False).head(1).set_index("task")
    return best.loc[list(dict.fromkeys(sweep["task"]))].reset_index()[["task", "lam", "accuracy", "normalized_accuracy"]]


def pair_interference(suite, lam: float = 1.0, split: str = "test", limit: int = None, tasks=None) -> pd.DataFrame:
    """For every ordered pair (t, s), t ≠ s: how adding v_s changes task t's accuracy.

    Rows: task (t, the task evaluated), other (s, the vector added), alone = accuracy of θ0 + λ v_t on t,
    together = accuracy of θ0 + λ (v_t + v_s) on t, change = together − alone. `limit` reads only the
    first images of each split (a quicker, coarser picture).
    """
    idx = list(range(len(suite.tasks))) if tasks is None else [suite.task_index(t) for t in tasks]
    pre, fts = suite.pretrained, suite.finetuned
    alone = {t: accuracy(suite, merging.task_arithmetic(pre, [fts[t]], lam=lam), t, split, limit=limit) for t in idx}
    rows = []
    for a, t in enumerate(idx):
        for s in idx[a + 1:]:
            pair = merging.task_arithmetic(pre, [fts[t], fts[s]], lam=lam)  # θ0 + λ(v_t + v_s): one model, two tasks
            for i, j in ((t, s), (s, t)):
                together = accuracy(suite, pair, i, split, limit=limit)
                rows.append({"task": suite.tasks[i], "other": suite.tasks[j], "alone": alone[i],
                             "together": together, "change": together - alone[i]})
    return pd.DataFrame(rows, columns=["task", "other", "alone", "together", "change"])
