"""Generalized task arithmetic: one mechanism, sparsify × sign consensus × scale.

Task arithmetic, simple averaging, TIES and DARE are the same computation with different options
(as in mergekit's `generalized_task_arithmetic`):

    v_t = θ_t − θ0                       task vectors
    v_t ← drop(v_t, p) / (1 − p)         DARE: random drop, survivors rescaled (optional)
    v_t ← top(v_t, density)              TIES: keep the largest magnitudes (optional)
    γ   = sign(Σ v_t), +1 where 0        TIES: sign election (optional)
    τ   = Σ_t v_t·[sign v_t = γ]         "sum", or divided by the count of agreeing non-zeros: "mean"
    θ   = θ0 + λ·τ

The work is done chunk by chunk per tensor, so no task vector is ever held whole.
"""
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.nn.functional import hardshrink

from . import native
from .checks import (
    check_choice,
    check_density,
    check_fraction,
    check_models,
    models_checked,
)
from .select import (
    SCOPES,
    chunk_size,
    fused_top,
    key_threshold,
    kth_largest_magnitude,
    num_kept,
    select_chunk_size,
    shrink_level,
    threshold_key,
)

StateDict = Mapping[str, Tensor]
Getter = Callable[[str], Tensor]  # key -> tensor; a dict's __getitem__ or a file reader


@dataclass(frozen=True)
class Recipe:
    """Options of the general mechanism (defaults: plain sum of task vectors)."""

    lam: float = 1.0  # scale λ applied to the merged task vector
    density: float = 1.0  # fraction kept by top-magnitude trimming (1 keeps all)
    scope: str = "global"  # "global" ranks a whole task vector at once, "tensor" each tensor
    drop: float = 0.0  # DARE drop probability p in [0, 1)
    seed: int = 0  # seeds DARE's drop masks
    consensus: bool = False  # TIES sign election
    merge: str = "sum"  # "sum" or "mean" over the tasks that contribute (and agree)

    def __post_init__(self):
        if not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            raise ValueError(f"lam must be a finite number, got {self.lam!r}")
        check_density(self.density)
        check_fraction(self.drop, "drop", low_open=False, high_open=True)
        check_choice(self.scope, "scope", SCOPES)
        check_choice(self.merge, "merge", ("sum", "mean"))
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class MergeOutput:
    """A merged state dict and the realised density of each task's sparsified vector."""

    merged: dict[str, Tensor]
    density: list[float]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def task_vectors(pretrained: StateDict, finetuned: Sequence[StateDict]) -> list[dict[str, Tensor]]:
    """Task vectors v_t = θ_t − θ0 (arXiv 2212.04089).

    Args:
        pretrained: θ0, a dict of tensors.
        finetuned: [θ_t], one dict per task, with the keys and shapes of θ0.

    Returns:
        One dict per task, in task order.
    """
    check_models(pretrained, finetuned)
    return [{k: model[k] - pretrained[k] for k in pretrained} for model in finetuned]


def _drop_generator(recipe: Recipe, task: int, key: str, device: torch.device) -> torch.Generator:
    """The generator of DARE's masks for one task and tensor: a pure function of (seed, task, key)."""
    seed = hash((recipe.seed, task, zlib.crc32(key.encode()))) % (1 << 63)  # int hashes are not salted
    return torch.Generator(device=device).manual_seed(seed)


def vector_chunks(base: Tensor, model: Tensor, recipe: Recipe, task: int, key: str,
                  stride: int = 1, select: bool = False) -> Iterator[Tensor]:
    """Chunks of (model − base)[::stride] in the compute dtype, after DARE's random drop if any.

    `select=True` asks for the larger pieces of a selection pass, except under DARE, whose masks
    are drawn chunk by chunk and must match the merge pass.
    """
    b, m, dtype = base.reshape(-1)[::stride], model.reshape(-1)[::stride], compute_dtype(base.dtype)
    gen = _drop_generator(recipe, task, key, base.device) if recipe.drop else None
    size = select_chunk_size(base) if select and not recipe.drop else chunk_size(base)
    for start in range(0, b.numel(), size):
        v = m[start : start + size].to(dtype) - b[start : start + size].to(dtype)
        if gen is not None:
            keep = torch.empty_like(v).bernoulli_(1 - recipe.drop, generator=gen)  # (chunk,) of 0/1
            v.mul_(keep).div_(1 - recipe.drop)
        yield v


def vector_source(keys: Sequence[str], base: Getter, model: Getter, recipe: Recipe,
                  task: int) -> Callable[[int], Iterator[Tensor]]:
    """A selection source over the pieces of one task vector, restricted to `keys`, in key order."""

    def source(stride: int) -> Iterator[Tensor]:
        for key in keys:
            yield from vector_chunks(base(key), model(key), recipe, task, key, stride, select=True)

    return source


def task_thresholds(keys: Sequence[str], base: Getter, models: Sequence[Getter], recipe: Recipe,
                    total: int | None = None, fused: bool = True) -> list[tuple[Tensor, int]]:
    """Per task, the exact top-`density` threshold of its vector over `keys` (`total` entries) and its kept count.

    `fused` allows the fused kernels, which hold the tensors of `keys` of every task at once (not
    for models read from files).
    """
    total = sum(base(k).numel() for k in keys) if total is None else total
    k = num_kept(recipe.density, total)
    found = None
    if fused and not recipe.drop:
        found = fused_top([base(key) for key in keys], [[model(key) for key in keys] for model in models], k, total,
                          positions=False)
    return [
        (key_threshold(f.key, torch.float32), f.kept) if f is not None
        else kth_largest_magnitude(vector_source(keys, base, model, recipe, t), k, total)
        for t, (model, f) in enumerate(zip(models, found or [None] * len(models), strict=True))
    ]


def tensor_thresholds(key: str, base: Getter, models: Sequence[Getter], recipe: Recipe,
                      fused: bool = True) -> list[tuple[Tensor, int]]:
    """Tensor scope: per task, the exact top-`density` threshold of one tensor and its kept count."""
    n = base(key).numel()
    if n == 0:
        return [(torch.zeros((), dtype=compute_dtype(base(key).dtype)), 0)] * len(models)
    return task_thresholds([key], base, models, recipe, n, fused)


class _Combiner:
    """Running sums over tasks for one chunk: Σv, Σ positive parts, Σ sign, Σ |sign|."""

    def __init__(self, recipe: Recipe):
        self.recipe, self.total = recipe, None

    def add(self, v: Tensor) -> None:
        """Fold one task's (sparsified) chunk into the sums; takes ownership of `v`."""
        r = self.recipe
        sign = v.sign() if r.merge == "mean" else None
        if self.total is None:
            self.total = v
            self.pos = v.clamp_min(0) if r.consensus else None
            self.signs = sign if sign is not None and r.consensus else None
            self.count = sign.abs() if sign is not None else None
            return
        self.total.add_(v)
        if r.consensus:
            self.pos.add_(v.clamp_min(0))
        if sign is not None:
            if r.consensus:
                self.signs.add_(sign)
            self.count.addcmul_(sign, sign)

    def result(self) -> Tensor:
        """τ for this chunk: the (agreeing) sum, or its mean over contributing tasks."""
        r = self.recipe
        if not r.consensus:
            return self.total if r.merge == "sum" else self.total / self.count.clamp_min(1)
        neg_part = self.total - self.pos  # Σ of negative parts
        negative = self.total.sign().clamp_max_(0).neg_()  # 1 where γ = −1 (sum < 0), else 0
        if r.merge == "mean":
            n_pos = (self.count + self.signs).mul_(0.5)  # tasks with v > 0
            n_neg = (self.count - self.signs).mul_(0.5)  # tasks with v < 0
            self.pos.div_(n_pos.clamp_min_(1))
            neg_part.div_(n_neg.clamp_min_(1))
        return self.pos.mul_(1 - negative).addcmul_(neg_part, negative)  # exact select, no branch


def merge_tensor(key: str, base: Getter, models: Sequence[Getter], recipe: Recipe,
                 thresholds: Sequence[Tensor] | None, task_major: bool = False) -> tuple[Tensor, list[int]]:
    """θ0 + λτ for one tensor, and the entries kept per task when trimming per tensor.

    Chunk-major order (default) keeps each chunk's sums in cache while every task passes over it;
    task-major order holds one task's tensor at a time (for models read from files).
    """
    b = base(key)
    kept = [0] * len(models)
    if b.numel() == 0:
        return b.clone(), kept
    if recipe.density < 1 and recipe.scope == "tensor":
        per_task = tensor_thresholds(key, base, models, recipe, not task_major)
        thresholds, kept = [thr for thr, _ in per_task], [n for _, n in per_task]
    if not task_major and not recipe.drop:
        tensors = [model(key) for model in models]
        if native.applies(b, *tensors):
            keep = [max(threshold_key(thr), 1) for thr in thresholds] if recipe.density < 1 else None
            return native.merge(b, tensors, keep, recipe.consensus, recipe.merge == "mean", recipe.lam), kept
    levels = [shrink_level(thr) for thr in thresholds] if recipe.density < 1 else None
    trim = (lambda v, t: hardshrink(v, levels[t])) if levels is not None else (lambda v, t: v)  # noqa: E731
    out = torch.empty_like(b)
    flat_out, flat_b = out.view(-1), b.reshape(-1)

    size = chunk_size(b)

    def finish(start: int, combiner: _Combiner) -> None:
        tau = combiner.result()
        flat_out[start : start + size] = tau.mul_(recipe.lam).add_(flat_b[start : start + size].to(tau.dtype))

    starts = range(0, b.numel(), size)
    if task_major:
        combiners = [_Combiner(recipe) for _ in starts]
        for t, model in enumerate(models):
            for combiner, v in zip(combiners, vector_chunks(b, model(key), recipe, t, key), strict=True):
                combiner.add(trim(v, t))
        for start, combiner in zip(starts, combiners, strict=True):
            finish(start, combiner)
    else:
        streams = [vector_chunks(b, model(key), recipe, t, key) for t, model in enumerate(models)]
        for start in starts:
            combiner = _Combiner(recipe)
            for t, stream in enumerate(streams):
                combiner.add(trim(next(stream), t))
            finish(start, combiner)
    return out, kept


def merge_getters(keys: Sequence[str], base: Getter, models: Sequence[Getter], recipe: Recipe,
                  kept: list[int] | None = None, total: int | None = None,
                  task_major: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Yield (key, merged tensor) one tensor at a time, adding each task's kept count to `kept`."""
    kept = [0] * len(models) if kept is None else kept
    thresholds = None
    if recipe.density < 1 and recipe.scope == "global":
        found = task_thresholds(keys, base, models, recipe, total, fused=not task_major)
        thresholds = [thr for thr, _ in found]
        kept[:] = [a + n for a, (_, n) in zip(kept, found, strict=True)]
    for key in keys:
        merged, kept_here = merge_tensor(key, base, models, recipe, thresholds, task_major)
        kept[:] = [a + b for a, b in zip(kept, kept_here, strict=True)]
        yield key, merged


def merge_with_recipe(pretrained: StateDict, finetuned: Sequence[StateDict], recipe: Recipe) -> MergeOutput:
    """Merge in memory with the general mechanism; also reports each task's realised density.

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        recipe: the options (see `Recipe`).

    Returns:
        MergeOutput with `.merged` and `.density` (per task, 1.0 when nothing is trimmed).
    """
    with models_checked(pretrained, finetuned):
        return merge_validated(pretrained, finetuned, recipe)


def merge_validated(pretrained: StateDict, finetuned: Sequence[StateDict], recipe: Recipe) -> MergeOutput:
    """merge_with_recipe on inputs already validated."""
    total = sum(t.numel() for t in pretrained.values())
    kept = [0] * len(finetuned)
    getters = [model.__getitem__ for model in finetuned]
    merged = dict(merge_getters(list(pretrained), pretrained.__getitem__, getters, recipe, kept))
    density = [n / total for n in kept] if recipe.density < 1 else [1.0] * len(finetuned)
    return MergeOutput(merged, density)
