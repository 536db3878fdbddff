"""Sign consensus, measured: where the tasks' (trimmed) vectors disagree in sign, and what TIES's election keeps.

TIES (arXiv 2306.01708, §3) trims each task vector v_t to v̂_t = top(v_t, m), elects a sign
γ = sign(Σ_t v̂_t) per entry (+1 where the sum is 0) and averages, per entry, the tasks whose sign
agrees with γ. These functions count, tensor by tensor, what that does: entries whose kept
contributions disagree in sign before the election and after it, the contributions the election
discards, and how many tasks agree at each entry of the merged vector τ.
"""
import re
from typing import Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..merging import top

StateDict = Mapping[str, Tensor]
_BLOCK = re.compile(r"\.(\d+)\.")


def layer_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key's layer: "block i" for keys numbered i (`…resblocks.3.…`), else "input" before the blocks, "output" after."""
    names, seen_block = {}, False
    for key in keys:
        found = _BLOCK.search(f".{key}.")
        if found:
            seen_block = True
            names[key] = f"block {int(found.group(1))}"
        else:
            names[key] = "output" if seen_block else "input"
    return names


def trimmed_stacks(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 1.0,
                   scope: str = "global") -> Iterator[tuple[str, Tensor]]:
    """Per key, the tasks' trimmed vectors v̂_t = top(v_t, density) stacked: (key, (T, n)); density 1 keeps all."""
    vectors = [{k: ft[k].float() - pretrained[k].float() for k in pretrained} for ft in finetuned]
    if density < 1:
        vectors = [top(v, density, scope)[0] for v in vectors]
    for key in pretrained:
        yield key, torch.stack([v[key].reshape(-1) for v in vectors])  # (T, n)


def elected_agreement(stack: Tensor) -> tuple[Tensor, Tensor]:
    """γ = sign(Σ_t v̂_t) with +1 where the sum is 0, and the mask of contributions agreeing with it: (n,), (T, n)."""
    gamma = torch.where(stack.sum(0) >= 0, 1.0, -1.0)  # (n,)
    return gamma, stack.sign() == gamma  # zeros never agree


def _conflicting(stack: Tensor) -> Tensor:
    """Entries holding both a positive and a negative contribution: (n,) bool."""
    return (stack > 0).any(0) & (stack < 0).any(0)


def sign_conflicts(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 1.0,
                   scope: str = "global") -> pd.DataFrame:
    """Per layer, sign conflicts among the tasks' trimmed vectors before and after TIES's election.

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        density: fraction kept by trimming (1 = the untrimmed v_t).
        scope: "global" or "tensor", as in `merging.ties`.

    Returns:
        One row per layer: entries; active (kept by at least one task); conflicting (kept with both
        signs) and conflicting_after (the same among the contributions the election keeps: zero by
        construction); their shares conflict_fraction and conflict_fraction_after (of active
        entries); discarded_fraction and discarded_mass_fraction (the shares of kept contributions,
        by count and by Σ|v̂_t|, whose sign differs from γ).
    """
    rows = []
    layers = layer_names(list(pretrained))
    for key, stack in trimmed_stacks(pretrained, finetuned, density, scope):
        _, agree = elected_agreement(stack)
        nonzero = stack != 0  # (T, n)
        kept = stack * agree  # (T, n): what the disjoint merge averages
        rows.append({
            "layer": layers[key], "entries": stack.shape[1], "active": int(nonzero.any(0).sum()),
            "conflicting": int(_conflicting(stack).sum()), "conflicting_after": int(_conflicting(kept).sum()),
            "contributions": int(nonzero.sum()), "discarded": int((nonzero & ~agree).sum()),
            "mass": float(stack.abs().sum()), "discarded_mass": float((stack.abs() * ~agree).sum()),
        })
    df = pd.DataFrame(rows).groupby("layer", sort=False, as_index=False).sum()
    active = df["active"].clip(lower=1)
    df["conflict_fraction"] = df["conflicting"] / active
    df["conflict_fraction_after"] = df["conflicting_after"] / active
    df["discarded_fraction"] = df["discarded"] / df["contributions"].clip(lower=1)
    df["discarded_mass_fraction"] = df["discarded_mass"] / df["mass"].where(df["mass"] > 0, 1.0)
    df.insert(1, "density", density)
    return df


def conflict_totals(by_layer: pd.DataFrame) -> pd.Series:
    """The whole model's shares from `sign_conflicts` rows: conflict_fraction(_after), discarded(_mass)_fraction."""
    s = by_layer[["active", "conflicting", "conflicting_after", "contributions", "discarded", "mass",
                  "discarded_mass"]].sum()
    return pd.Series({
        "conflict_fraction": s["conflicting"] / max(s["active"], 1),
        "conflict_fraction_after": s["conflicting_after"] / max(s["active"], 1),
        "discarded_fraction": s["discarded"] / max(s["contributions"], 1),
        "discarded_mass_fraction": s["discarded_mass"] / s["mass"] if s["mass"] > 0 else 0.0,
    })


def agreement_counts(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.2,
                     scope: str = "global") -> pd.DataFrame:
    """How many tasks agree with γ at each non-zero entry of TIES's τ: the divisor of its disjoint mean.

    Returns one row per count c = 1..T: density, entries (of τ with c agreeing tasks), share (of τ's
    non-zero entries) and sum_share (share of ‖Σ_t v̂_t·[sign v̂_t = γ]‖₁, the "sum" merge, held by those entries).
    """
    num_tasks = len(finetuned)
    entries = torch.zeros(num_tasks + 1, dtype=torch.float64)
    mass = torch.zeros(num_tasks + 1, dtype=torch.float64)
    for _, stack in trimmed_stacks(pretrained, finetuned, density, scope):
        _, agree = elected_agreement(stack)
        count = agree.sum(0)  # (n,): tasks agreeing at each entry
        summed = (stack * agree).sum(0).abs().double()  # (n,): |τ_sum|
        entries += torch.bincount(count, minlength=num_tasks + 1).double()
        mass += torch.bincount(count, weights=summed, minlength=num_tasks + 1)
    counts = range(1, num_tasks + 1)
    total, total_mass = float(entries[1:].sum()), float(mass[1:].sum())
    return pd.DataFrame({
        "density": density, "count": list(counts), "entries": [int(entries[c]) for c in counts],
        "share": [float(entries[c]) / max(total, 1) for c in counts],
        "sum_share": [float(mass[c]) / total_mass if total_mass else 0.0 for c in counts],
    })


def divisor_spread(counts: pd.DataFrame) -> pd.Series:
    """How uneven TIES's mean is, from `agreement_counts` rows of one density, weighting entries by their summed magnitude.

    Returns mean_count (the average |A_i|: the mean is the sum divided by about this much) and
    weight_cv (the coefficient of variation of the mean's per-entry weights 1/|A_i|: 0 when the
    mean is a uniform rescale of the sum).
    """
    w = counts["sum_share"] / counts["sum_share"].sum()
    inv = 1 / counts["count"]
    mean_inv = float((w * inv).sum())
    cv = float((w * (inv - mean_inv) ** 2).sum()) ** 0.5 / mean_inv
    return pd.Series({"mean_count": float((w * counts["count"]).sum()), "weight_cv": cv})
