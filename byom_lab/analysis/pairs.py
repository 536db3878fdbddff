"""Merging a pair of tasks: how aligned their task vectors are, how far λ Σ v_s carries each task along its own v_t, λ per pair.

For task vectors v_t = θ_t − θ0 and task arithmetic θ* = θ0 + λ Σ_s v_s, the merged model moves
along task t's own direction by  reach_t(λ) = λ ⟨Σ_s v_s, v_t⟩ / ‖v_t‖²  (1 = exactly as far as
task t's fine-tuning went). For two tasks, reach_1 = λ (1 + cos·‖v_2‖/‖v_1‖): aligned vectors
(cos near 1) overshoot at λ = 1, orthogonal ones (cos near 0) land on the mark.

Orthogonal in weights is not orthogonal in function: `feature_shift` measures how far each
vector moves the image features of each task's own images, and `cross_accuracy` what the
other task's fine-tuned model does to a task's accuracy.
"""
from typing import Mapping

import pandas as pd
import torch

from .. import forward
from ..evaluation import evaluate, reference_accuracy
from ..merging import task_arithmetic
from ..model import encode_images
from ..selection import LAMBDA_GRID, select_lambda
from .spectra import layer_kind


def flat_task_vectors(suite) -> torch.Tensor:
    """v_t = θ_t − θ0 of every task, flattened over the suite's keys in float64: (T, N)."""
    keys = list(suite.pretrained)
    theta0 = torch.cat([suite.pretrained[k].reshape(-1).double() for k in keys])  # (N,)
    return torch.stack([torch.cat([ft[k].reshape(-1).double() for k in keys]) - theta0 for ft in suite.finetuned])


def geometry(vectors: torch.Tensor, names) -> pd.DataFrame:
    """One row per task: ‖v_t‖, its cosine with the sum of the others, ‖Σ v_s‖ and reach_t(1) = ⟨Σ v_s, v_t⟩/‖v_t‖²."""
    total = vectors.sum(0)  # (N,)
    rows = []
    for t, name in enumerate(names):
        v = vectors[t]
        others = total - v
        norm, other_norm = float(v.norm()), float(others.norm())
        cosine = float(v @ others) / (norm * other_norm) if norm > 0 and other_norm > 0 else 0.0
        rows.append({"task": name, "norm": norm, "others_norm": other_norm, "cosine": cosine,
                     "sum_norm": float(total.norm()), "reach_at_1": float(total @ v) / norm**2 if norm > 0 else 0.0})
    return pd.DataFrame(rows)


def pair_geometry(suites: Mapping[str, object]) -> pd.DataFrame:
    """`geometry` of each named suite's task vectors, with a `pair` column (e.g. {"tiny-similar": suite, …})."""
    frames = [geometry(flat_task_vectors(s), s.tasks).assign(pair=name) for name, s in suites.items()]
    return pd.concat(frames, ignore_index=True)[["pair", "task", "norm", "others_norm", "cosine", "sum_norm", "reach_at_1"]]


def overshoot(vectors: torch.Tensor, names, lams) -> pd.DataFrame:
    """Per λ and task: reach_t(λ) = λ⟨Σ v_s, v_t⟩/‖v_t‖² and the length ratio λ‖Σ v_s‖/‖v_t‖."""
    total = vectors.sum(0)
    rows = []
    for t, name in enumerate(names):
        v = vectors[t]
        along, length = float(total @ v) / float(v @ v), float(total.norm() / v.norm())
        for lam in lams:
            rows.append({"task": name, "lam": float(lam), "reach": lam * along, "length_ratio": lam * length})
    return pd.DataFrame(rows)


def pair_overshoot(suites: Mapping[str, object], lams=LAMBDA_GRID) -> pd.DataFrame:
    """`overshoot` of each named suite, with a `pair` column."""
    frames = [overshoot(flat_task_vectors(s), s.tasks, lams).assign(pair=name) for name, s in suites.items()]
    return pd.concat(frames, ignore_index=True)


def layer_cosines(suite) -> pd.DataFrame:
    """Cosine between the task vectors of a two-task suite, tensor by tensor (matrices only), with their norms."""
    if len(suite.tasks) != 2:
        raise ValueError(f"layer_cosines needs a pair of tasks, suite {suite.name!r} has {len(suite.tasks)}")
    rows = []
    for k, w in suite.pretrained.items():
        if w.ndim != 2:
            continue
        v1, v2 = (ft[k].double() - w.double() for ft in suite.finetuned)
        n1, n2 = float(v1.norm()), float(v2.norm())
        block, kind = layer_kind(k)
        rows.append({"layer": k, "block": block, "kind": kind, "cosine": float((v1 * v2).sum()) / (n1 * n2) if n1 * n2 > 0 else 0.0,
                     "norm_1": n1, "norm_2": n2})
    return pd.DataFrame(rows)


def lambda_curves(suites: Mapping[str, object], grid=LAMBDA_GRID) -> pd.DataFrame:
    """Task arithmetic on each named suite across λ, on the validation split: mean accuracy and mean normalized accuracy.

    λ is chosen by `selection.select_lambda` (cached); the per-task accuracies behind it are memoised, so
    the normalized curve costs no new evaluation. `chosen` marks the selected λ of each pair.
    """
    frames = []
    for name, suite in suites.items():
        best, _ = select_lambda(suite, "task_arithmetic", grid=grid)
        reference_accuracy(suite, "val")
        for lam in grid:
            df = evaluate(suite, task_arithmetic(suite.pretrained, suite.finetuned, lam=float(lam)), "val")
            frames.append({"pair": name, "lam": float(lam), "val_accuracy": float(df["accuracy"].mean()),
                           "val_normalized": float(df["normalized_accuracy"].mean()), "chosen": float(lam) == best})
    return pd.DataFrame(frames)


@torch.inference_mode()
def _features(suite, state_dict, x):
    """L2-normalised image features of preprocessed images x under state_dict, on the suite's device."""
    device = next(suite.visual.parameters()).device
    if forward.supports(suite.visual):
        sd = {k: v.to(device) for k, v in state_dict.items()}
        return torch.nn.functional.normalize(forward.image_features(suite.visual, sd, x.to(device)), dim=-1).cpu()
    return encode_images(suite.visual, x.to(device), state_dict).cpu()


def feature_shift(suite, split: str = "val", limit: int = 100, lam: float = 1.0) -> pd.DataFrame:
    """How far each model moves a task's image features from θ0's, on that task's first `limit` images of `split`.

    One row per task t and model: "own" θ0 + v_t, "other" θ0 + Σ_{s≠t} v_s, "merged" θ0 + λ Σ_s v_s. Columns:
    `shift` = mean ‖f_θ(x) − f_θ0(x)‖ (features L2-normalised, so at most 2) and `from_own` = mean ‖f_θ(x) − f_θt(x)‖.
    """
    vectors = [{k: ft[k] - suite.pretrained[k] for k in suite.pretrained} for ft in suite.finetuned]
    total = {k: sum(v[k] for v in vectors) for k in suite.pretrained}
    merged = {k: suite.pretrained[k] + lam * total[k] for k in suite.pretrained}
    rows = []
    for t, task in enumerate(suite.tasks):
        x, _ = suite.inputs(t, split)
        x = x[:limit]
        x = suite.normalize(x) if x.dtype == torch.uint8 else x
        other = {k: suite.pretrained[k] + total[k] - vectors[t][k] for k in suite.pretrained}
        base, own = _features(suite, suite.pretrained, x), _features(suite, suite.finetuned[t], x)
        for label, sd in (("own", suite.finetuned[t]), ("other", other), ("merged", merged)):
            f = own if label == "own" else _features(suite, sd, x)
            rows.append({"task": task, "model": label, "shift": float((f - base).norm(dim=1).mean()),
                         "from_own": float((f - own).norm(dim=1).mean())})
    return pd.DataFrame(rows)


def pair_feature_shift(suites: Mapping[str, object], split: str = "val", limit: int = 100, lam: float = 1.0) -> pd.DataFrame:
    """`feature_shift` of each named two-task suite, with a `pair` column."""
    frames = [feature_shift(s, split, limit, lam).assign(pair=name) for name, s in suites.items()]
    return pd.concat(frames, ignore_index=True)


def cross_accuracy(suites: Mapping[str, object], split: str = "test") -> pd.DataFrame:
    """Per pair and task t: accuracy of θ0 (zero-shot), of the other task's fine-tuned model, and of θ_t itself."""
    rows = []
    for name, suite in suites.items():
        if len(suite.tasks) != 2:
            raise ValueError(f"cross_accuracy needs pairs of tasks, suite {suite.name!r} has {len(suite.tasks)}")
        zero_shot = evaluate(suite, suite.pretrained, split)["accuracy"].tolist()
        swapped = evaluate(suite, suite.finetuned[::-1], split)["accuracy"].tolist()
        own = reference_accuracy(suite, split)
        for t, task in enumerate(suite.tasks):
            rows.append({"pair": name, "task": task, "zero_shot": zero_shot[t], "other_model": swapped[t],
                         "own_model": own[t], "other_effect": swapped[t] - zero_shot[t]})
    return pd.DataFrame(rows)
