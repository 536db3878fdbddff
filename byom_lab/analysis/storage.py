"""What merging costs and buys: storage formulas, the accuracy–storage Pareto front, the best method per byte
budget, and how interference grows with the number of tasks merged.

    T full models        T·N parameters
    task arithmetic      N shared, nothing per task
    BYOM-FFT / post-pr.  N shared + per task m·N entries, each an int32 index and a float32 value (8 bytes)
    BYOM-LoRA            N shared + per task q·(d_out + d_in + 1) per adapted matrix
    EMR-Merging          2N shared (θ0 and τ) + per task N mask bits and one float32 scale

Symbols as in DESIGN.md: θ0, θ_t, v_t = θ_t − θ0, λ, θ* = θ0 + λ Σ v_t, u_t = θ_t − θ*, m = density.
"""
import random
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..merging.select import num_kept

INDEX_BYTES = 4  # int32 flat index of a kept entry
VALUE_BYTES = 4  # float32 value (parameter, kept entry, singular vector entry, scale)


def storage_formulas(n_params: int, num_tasks: int, densities: Sequence[float] = (0.01, 0.1),
                     lora_shapes: Sequence[tuple[int, int]] = (), ranks: Sequence[int] = (),
                     value_bytes: int = VALUE_BYTES, index_bytes: int = INDEX_BYTES) -> pd.DataFrame:
    """Bytes each method stores, from its formula: shared, per task, and in all for `num_tasks` tasks.

    Args:
        n_params: N, the parameters of one model (what is merged).
        num_tasks: T.
        densities: the m values (fractions) of BYOM-FFT and post-pruning.
        lora_shapes: (d_out, d_in) of every LoRA-adapted matrix.
        ranks: the q values of BYOM-LoRA.

    Returns:
        One row per method: method, formula, params_per_task, bytes_per_task, shared_bytes, total_bytes.
    """
    N, T = n_params, num_tasks
    rows = [("individual fine-tuned (full)", "T·N", N, value_bytes * N, 0),
            ("task arithmetic", "N", 0, 0, value_bytes * N)]
    for d in densities:
        k = num_kept(d, N)
        for name in ("post-pruning", "BYOM-FFT"):
            rows.append((f"{name} m={100 * d:g}%", "N + T·mN·(index + value)", k, (index_bytes + value_bytes) * k,
                         value_bytes * N))
    for q in ranks:
        per_task = sum(min(q, d_out, d_in) * (d_out + d_in + 1) for d_out, d_in in lora_shapes)
        rows.append((f"BYOM-LoRA q={q}", "N + T·Σ q(d_out + d_in + 1)", per_task, value_bytes * per_task,
                     value_bytes * N))
    rows.append(("EMR-Merging", "2N + T·(N bits + 1 scalar)", -(-N // 32) + 1, -(-N // 8) + value_bytes,
                 2 * value_bytes * N))
    df = pd.DataFrame(rows, columns=["method", "formula", "params_per_task", "bytes_per_task", "shared_bytes"])
    df["total_bytes"] = df["shared_bytes"] + T * df["bytes_per_task"]
    return df.set_index("method")


def measured_storage(results: Mapping[str, object]) -> pd.DataFrame:
    """Per result object (label -> result), the parameters and bytes it really stores per task (mean over tasks)."""
    rows = [{"method": label, "params_per_task": r.num_params(), "bytes_per_task": r.nbytes()}
            for label, r in results.items()]
    return pd.DataFrame(rows).set_index("method")


def total_storage(formulas: pd.DataFrame, num_tasks: Sequence[int],
                  methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Total bytes (shared + T·per task) of each method for each T in `num_tasks`, tidy (method, T, total_bytes)."""
    rows = formulas if methods is None else formulas.loc[list(methods)]
    return pd.DataFrame([{"method": m, "T": T, "total_bytes": int(r.shared_bytes + T * r.bytes_per_task)}
                         for m, r in rows.iterrows() for T in num_tasks])


def families(table: pd.DataFrame) -> pd.Series:
    """Which checkpoints each row needs: "LoRA fine-tunes" for LoRA rows, "full fine-tunes" for the rest."""
    return pd.Series(["LoRA fine-tunes" if "LoRA" in m else "full fine-tunes" for m in table.index],
                     index=table.index, name="family")


def pareto_front(table: pd.DataFrame, cost: str = "extra_bytes_per_task", value: str = "average",
                 by: pd.Series | None = None) -> pd.Series:
    """True for rows no other row beats: none costs no more and scores at least as well, one of them strictly.

    With `by` (a group per row, e.g. `families(table)`), rows compete only within their group.
    """
    groups = by if by is not None else pd.Series(0, index=table.index)
    on = pd.Series(False, index=table.index, name="pareto")
    for _, idx in groups.groupby(groups).groups.items():
        c, v = table.loc[idx, cost].to_numpy(), table.loc[idx, value].to_numpy()
        for i, (c1, v1) in enumerate(zip(c, v)):
            on[idx[i]] = not any(c2 <= c1 and v2 >= v1 and (c2 < c1 or v2 > v1) for c2, v2 in zip(c, v))
    return on


def best_under_budget(table: pd.DataFrame, budgets: Sequence[float], cost: str = "extra_bytes_per_task",
                      value: str = "average") -> pd.DataFrame:
    """For each byte budget per task, the row with the best `value` among those costing at most the budget."""
    rows = []
    for budget in budgets:
        fits = table[table[cost] <= budget]
        if fits.empty:
            rows.append({"budget_bytes": budget, "method": None, value: float("nan"), cost: float("nan")})
            continue
        best = fits[value].idxmax()
        rows.append({"budget_bytes": budget, "method": best, value: fits.loc[best, value], cost: fits.loc[best, cost]})
    return pd.DataFrame(rows)


def task_orders(n: int, orders: int, seed: int = 0) -> list[list[int]]:
    """The random task orders of `studies.num_tasks_study` (same generator, same draws)."""
    rng = random.Random(seed)
    return [rng.sample(range(n), n) for _ in range(orders)]


def _flat(state_dict: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    """The entries of `state_dict` as one float vector, tensors in the order of `keys` (not the dict's own)."""
    return torch.cat([state_dict[k].reshape(-1).float() for k in keys])  # (N,)


def top_energy(x: Tensor, density: float) -> tuple[float, float]:
    """(share of ‖x‖² in the top-`density` entries of |x|, ‖x − top(x)‖): what top-m% keeps and leaves."""
    k = max(1, round(density * x.numel()))
    sq = x.square()  # (N,)
    kept = float(sq.topk(k, sorted=False).values.sum())
    total = float(sq.sum())
    return (kept / total if total > 0 else 0.0), max(total - kept, 0.0) ** 0.5


def interference_vs_k(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], ks: Sequence[int],
                      orders: int = 3, lam: float = 0.3, density: float = 0.1, seed: int = 0) -> pd.DataFrame:
    """Per order, k and merged task t, the norms behind task arithmetic's loss and BYOM-FFT's repair.

    Merging the first k tasks of each order (as `studies.num_tasks_study`), with θ* = θ0 + λ Σ_s v_s:
    u_t = θ_t − θ* = (1 − λ) v_t − λ Σ_{s≠t} v_s. All norms are divided by ‖v_t‖.

    Returns:
        Tidy DataFrame: order, k, task, interference (‖λ Σ_{s≠t} v_s‖), residual (‖u_t‖), kept_energy
        (share of ‖u_t‖² in its top-m%), left_after_top (‖u_t − top(u_t, m)‖: the error BYOM-FFT leaves).
    """
    keys = list(pretrained)
    theta0 = _flat(pretrained, keys)
    v = torch.stack([_flat(ft, keys) - theta0 for ft in finetuned])  # (T, N)
    norms = v.norm(dim=1)  # (T,)
    rows = []
    for o, perm in enumerate(task_orders(len(finetuned), orders, seed)):
        for k in ks:
            chosen = perm[:k]
            total = v[chosen].sum(0)  # (N,): Σ_s v_s over the merged tasks
            for t in chosen:
                u = v[t] - lam * total  # (N,): θ_t − θ*
                kept, left = top_energy(u, density)
                rows.append({"order": o, "k": k, "task": t,
                             "interference": float((lam * (total - v[t])).norm() / norms[t]),
                             "residual": float(u.norm() / norms[t]), "kept_energy": kept,
                             "left_after_top": left / float(norms[t])})
    return pd.DataFrame(rows)


def sqrt_fit(k: Sequence[float], y: Sequence[float]) -> float:
    """The c of y ≈ c·√(k − 1) by least squares (how interference would grow for orthogonal, equal-norm v_s)."""
    x = torch.tensor([float(ki - 1) ** 0.5 for ki in k], dtype=torch.float64)
    y = torch.tensor(list(y), dtype=torch.float64)
    return float((x * y).sum() / (x * x).sum())
