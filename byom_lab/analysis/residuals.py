"""Why merge-then-prune stores less than prune-then-merge: the two residuals a task keeps, measured.

Post-pruning keeps top(v_t, m) on θ0, with v_t = θ_t − θ0; BYOM-FFT keeps top(u_t, m) on θ*, with
u_t = θ_t − θ* (arXiv 2310.01886). Same number of entries, different anchor. Since
u_t = v_t − d with d = θ* − θ0 the merged direction, everything here follows from v, u and d:

- `residual_norms`: ‖v_t‖ against ‖u_t‖, and how much of v_t lies along d;
- `pruning_curves`: per m, the energy share ‖top(x, m)‖² / ‖x‖², the error ‖x − top(x, m)‖ / ‖v_t‖ and the
  progress of the rebuilt model along v_t;
- `magnitude_histogram`: how |v_t| and |u_t| are distributed;
- `kept_by_tensor`: where a sparse result's kept entries live, tensor by tensor (`anatomy.layer_of`, `tensor_kind`);
- `agreement_by_kind`: per kind of tensor, how much the task vectors agree and where the energy sits;
- `tie_check`: whether ties at the threshold explain where textbook and fast results differ;
- `storage`: bytes of m% entries (int32 index + float32 value) against T full models.

Residuals are flat: one row per task, (T, N). `v` and `u` are the keys used everywhere.
"""
import re
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from ..merging.select import num_kept
from ..merging.textbook import flatten
from .anatomy import layer_of
from .storage import INDEX_BYTES, VALUE_BYTES

StateDict = Mapping[str, Tensor]


def flat_residuals(pretrained: StateDict, finetuned: Sequence[StateDict], merged: StateDict) -> dict[str, Tensor]:
    """{"v": θ_t − θ0, "u": θ_t − θ*}, each flattened in θ0's key order and stacked: (T, N) float32."""
    models = torch.stack([flatten(ft, like=pretrained).float() for ft in finetuned])  # (T, N)
    return {"v": models - flatten(pretrained).float(), "u": models - flatten(merged, like=pretrained).float()}


def merged_direction(residuals: Mapping[str, Tensor]) -> Tensor:
    """d = θ* − θ0 = v_t − u_t (the same for every t): (N,)."""
    return residuals["v"][0] - residuals["u"][0]


def residual_norms(residuals: Mapping[str, Tensor], tasks: Sequence[str]) -> pd.DataFrame:
    """Per task: ‖v_t‖, ‖u_t‖, their ratio, and how v_t relates to the merged direction d = θ* − θ0.

    Columns: task, v_norm, u_norm, ratio (‖u_t‖ / ‖v_t‖), cos_v_d = cos(v_t, d) (its square is the
    share of ‖v_t‖² along d), covered = ⟨v_t, d⟩ / ‖v_t‖² (how far along v_t the merge alone goes:
    θ* − θ0 projected on v_t, in units of v_t), cos_u_v = cos(u_t, v_t). Since
    ‖u_t‖² = ‖v_t‖² − 2⟨v_t, d⟩ + ‖d‖², u_t is shorter than v_t exactly when ⟨v_t, d⟩ > ‖d‖² / 2.
    """
    d = merged_direction(residuals).double()  # (N,)
    rows = []
    for t, task in enumerate(tasks):
        v, u = residuals["v"][t].double(), residuals["u"][t].double()  # (N,)
        v_norm, u_norm, vd = float(v.norm()), float(u.norm()), float(v @ d)
        rows.append({"task": task, "v_norm": v_norm, "u_norm": u_norm, "ratio": u_norm / v_norm,
                     "cos_v_d": vd / max(v_norm * float(d.norm()), 1e-30), "covered": vd / max(v_norm**2, 1e-30),
                     "cos_u_v": float(u @ v) / max(u_norm * v_norm, 1e-30)})
    return pd.DataFrame(rows)


def pruning_curves(residuals: Mapping[str, Tensor], tasks: Sequence[str], densities: Sequence[float]) -> pd.DataFrame:
    """For each residual x (v or u), task and m: what top(x, m) keeps of x, and where it leaves the task.

    Columns: residual ("v" or "u"), task, density, m_percent, kept (entries), threshold (smallest
    kept |x|), energy_share = ‖top(x, m)‖² / ‖x‖², and two views of the rebuilt model
    θ̂_t = anchor + top(x, m), both in units of v_t: error = ‖θ_t − θ̂_t‖ / ‖v_t‖ (its distance from
    θ_t) and along_v = ⟨θ̂_t − θ0, v_t⟩ / ‖v_t‖² (how far it has come along v_t; 1 = all the way).
    For post-pruning (x = v) along_v equals energy_share.
    """
    rows = []
    n = residuals["v"].shape[1]
    k_max = max(num_kept(density, n) for density in densities)
    for t, task in enumerate(tasks):
        v = residuals["v"][t].double()  # (N,)
        v_sq = float(v @ v)
        for name in ("v", "u"):
            x = residuals[name][t]
            order = x.abs().topk(k_max).indices  # (k_max,): largest magnitudes first
            xs, vs = x.double()[order], v[order]
            energy = xs.square().cumsum(0)  # (k_max,): ‖top_k(x)‖² for k = 1..k_max
            along = (xs * vs).cumsum(0)  # (k_max,): ⟨top_k(x), v_t⟩
            x64 = x.double()
            total, start = float(x64 @ x64), v_sq - float(x64 @ v)  # ‖x‖², ⟨anchor − θ0, v_t⟩
            for density in densities:
                k = num_kept(density, x.numel())
                left = max(total - float(energy[k - 1]), 0.0)
                rows.append({"residual": name, "task": task, "density": density, "m_percent": 100 * density,
                             "kept": k, "threshold": float(xs[k - 1].abs()),
                             "energy_share": float(energy[k - 1]) / total if total > 0 else 1.0,
                             "error": (left / v_sq) ** 0.5 if v_sq > 0 else 0.0,
                             "along_v": (start + float(along[k - 1])) / v_sq if v_sq > 0 else 1.0})
    return pd.DataFrame(rows)


def magnitude_histogram(residuals: Mapping[str, Tensor], bins: int = 60) -> pd.DataFrame:
    """Distribution of |x| over every task and entry, for v and u, on shared log-spaced bins.

    Columns: residual, magnitude (bin centre), share (of all entries; zeros fall in no bin).
    """
    logs = {name: residuals[name].abs().log10() for name in ("v", "u")}  # (T, N); −inf at zeros
    finite = [lg[torch.isfinite(lg)] for lg in logs.values()]
    lo, hi = min(float(f.min()) for f in finite), max(float(f.max()) for f in finite)
    width = (hi - lo) / bins
    frames = []
    for name, lg in logs.items():
        counts = torch.histc(lg, bins, lo, hi)  # entries below lo (the zeros) are ignored
        centres = [10 ** (lo + (i + 0.5) * width) for i in range(bins)]
        frames.append(pd.DataFrame({"residual": name, "magnitude": centres, "share": (counts / lg.numel()).tolist()}))
    return pd.concat(frames, ignore_index=True)


def tie_check(models: Sequence[StateDict], result, tol: float = 1e-5) -> pd.DataFrame:
    """Where textbook models and a sparse result (BYOM-FFT, post-pruning) differ, and whether ties explain it.

    `torch.topk` keeps exactly k = round(m·N) entries and drops the rest of a tie at the threshold;
    the fast path keeps every tied entry. Columns per task: differing (entries differing by more than
    `tol`), extra_kept (entries the result kept beyond k), explained (differing <= extra_kept).
    """
    n = sum(t.numel() for t in models[0].values())
    k = num_kept(result.hyperparameters["density"], n)
    rows = []
    for t, model in enumerate(models):
        fast = result.task_state_dict(t)
        differing = sum(int(((model[key].float() - fast[key].float()).abs() > tol).sum()) for key in model)
        extra = result.task_params(t) - k
        rows.append({"task": t, "differing": differing, "extra_kept": extra, "explained": differing <= extra})
    return pd.DataFrame(rows)


def tensor_kind(key: str) -> str:
    """What a tensor is, across layers: "LayerNorm gain", "attention weight", "MLP bias", "embedding", ..."""
    name = key.rsplit(".", 1)[-1]
    if re.search(r"(^|\.)ln_", key):
        return "LayerNorm gain" if name == "weight" else "LayerNorm bias"
    for part, label in ((".attn.", "attention"), (".mlp.", "MLP")):
        if part in key:
            return f"{label} {'bias' if name.endswith('bias') else 'weight'}"
    return "projection" if key == "proj" else "embedding"


def kept_by_tensor(result, tasks: Sequence[str], like: StateDict) -> pd.DataFrame:
    """Where a sparse result (BYOM-FFT, post-pruning) keeps its entries: one row per task and tensor.

    Columns: task, tensor, position (order in the model), layer, kind, numel, kept, kept_share
    (kept / numel), budget_share (kept / all kept of the task).
    """
    rows = []
    for t, name in enumerate(tasks):
        total = sum(e.values.numel() for e in result.entries[t].values())
        for i, (key, ref) in enumerate(like.items()):
            kept = result.entries[t][key].values.numel()
            rows.append({"task": name, "tensor": key, "position": i, "layer": layer_of(key), "kind": tensor_kind(key),
                         "numel": ref.numel(), "kept": kept, "kept_share": kept / ref.numel() if ref.numel() else 0.0,
                         "budget_share": kept / total if total else 0.0})
    return pd.DataFrame(rows)


def agreement_by_kind(residuals: Mapping[str, Tensor], like: StateDict) -> pd.DataFrame:
    """Per tensor kind: how much the task vectors agree there, and what share of each residual's energy sits there.

    Columns: kind, entries (per task), mean_cos (mean over task pairs of cos(v_s, v_t) restricted to
    the kind), v_energy and u_energy (share of Σ_t ‖v_t‖², Σ_t ‖u_t‖² in the kind).
    """
    sizes, kinds = [t.numel() for t in like.values()], [tensor_kind(k) for k in like]
    parts = {name: residuals[name].split(sizes, dim=1) for name in ("v", "u")}  # per tensor: (T, n)
    energy = {name: [float(p.double().square().sum()) for p in parts[name]] for name in ("v", "u")}  # per tensor
    rows = []
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        v = torch.cat([parts["v"][i] for i in idx], dim=1).double()  # (T, n_kind)
        unit = torch.nn.functional.normalize(v, dim=1)
        cos, T = unit @ unit.T, len(v)  # (T, T)
        rows.append({"kind": kind, "entries": v.shape[1],
                     "mean_cos": float((cos.sum() - cos.diagonal().sum()) / (T * (T - 1))) if T > 1 else 1.0,
                     **{f"{name}_energy": sum(energy[name][i] for i in idx) / sum(energy[name]) for name in ("v", "u")}})
    return pd.DataFrame(rows)


def storage(num_params: int, num_tasks: int, densities: Sequence[float], param_bytes: int = 4) -> pd.DataFrame:
    """Bytes stored by merge-then-prune at each m against T full models.

    Per task: k = round(m·N) entries of INDEX_BYTES + VALUE_BYTES each; in all: one shared model
    (N·param_bytes) plus T such sets. Columns: m_percent, entries_per_task, bytes_per_task,
    total_bytes, full_models_bytes (T·N·param_bytes), share_of_full (total / full).
    """
    full = num_tasks * num_params * param_bytes
    rows = []
    for density in densities:
        k = num_kept(density, num_params)
        per_task = k * (INDEX_BYTES + VALUE_BYTES)
        total = num_params * param_bytes + num_tasks * per_task
        rows.append({"m_percent": 100 * density, "entries_per_task": k, "bytes_per_task": per_task,
                     "total_bytes": total, "full_models_bytes": full, "share_of_full": total / full})
    return pd.DataFrame(rows)
