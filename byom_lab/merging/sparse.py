"""BYOM-FFT and post-pruning: one step, `anchor + top(θ_t − anchor)`, after or without a merge.

BYOM-FFT (arXiv 2310.01886) merges first (any registered merger) and keeps, per task, the top-m%
of θ_t − θ*; post-pruning keeps the top-m% of θ_t − θ0 and merges nothing. Both are the same
compression step applied to a different anchor; only the order of "merge" and "prune" differs.
Kept entries are stored as flat indices + the fine-tuned values there (θ* + u_t = θ_t at a kept
entry), so density 1 restores every θ_t bit for bit.
"""
import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from .checks import check_choice, check_density, models_checked
from .general import Recipe, vector_source
from .registry import get_method, method_inputs, method_name, register
from .results import TaskExtras, recorded
from .select import SCOPES, fused_top, num_kept, top_positions

StateDict = Mapping[str, Tensor]


class SparseEntries(NamedTuple):
    """Kept entries of one tensor: flat indices (int32 when they fit) and the values there."""

    indices: Tensor
    values: Tensor


def pack_entries(entries: Mapping[str, SparseEntries]) -> dict[str, Tensor]:
    """One task's entries as the tensors of its file: `{key}::indices` and `{key}::values`."""
    return {f"{key}::{part}": tensor for key, e in entries.items() for part, tensor in e._asdict().items()}


def unpack_entries(tensors: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, SparseEntries]:
    """Inverse of `pack_entries`, in the order of `keys`."""
    return {key: SparseEntries(tensors[f"{key}::indices"], tensors[f"{key}::values"]) for key in keys}


def entries_nbytes(entries: Mapping[str, SparseEntries]) -> int:
    """Bytes of the indices and values of one task's entries."""
    return sum(e.indices.nbytes + e.values.nbytes for e in entries.values())


@dataclass
class SparseTaskResult(TaskExtras):
    """A shared model plus, per task, a sparse set of entries replaced by the task's own values."""

    kind: ClassVar[str] = "sparse"
    merged: dict[str, Tensor]
    entries: list[dict[str, SparseEntries]]  # entries[t][key]
    density: list[float]  # realised fraction of entries kept, per task

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.entries)

    def task_state_dict(self, t: int) -> dict[str, Tensor]:
        """The full state dict for task t: merged with task t's kept entries written in."""
        self._check_task(t)
        out = {}
        for key, shared in self.merged.items():
            tensor = shared.clone()
            kept = self.entries[t][key]
            tensor.view(-1).index_copy_(0, kept.indices.long(), kept.values)
            out[key] = tensor
        return out

    def task_params(self, t: int) -> int:
        """Kept entries of task t: the paper's m% of the parameters."""
        return sum(e.values.numel() for e in self.entries[t].values())

    def task_bytes(self, t: int) -> int:
        """Bytes of task t's indices and values."""
        return entries_nbytes(self.entries[t])

    def stored_shared(self) -> dict[str, dict[str, Tensor]]:
        """The shared files: {file stem: tensors}."""
        return {"shared": self.merged}

    def stored_task(self, t: int) -> dict[str, Tensor]:
        """The tensors of task t's file: int32 indices and values per key."""
        return pack_entries(self.entries[t])

    def stored_info(self) -> dict:
        """What the manifest records besides tensors: the realised densities."""
        return {"density": list(self.density)}

    @classmethod
    def from_stored(cls, shared: dict, tasks: list[dict], manifest: dict) -> "SparseTaskResult":
        """The result from its files' tensors and manifest (inverse of the `stored_*` methods)."""
        keys = manifest["keys"]
        return cls(shared["shared"], [unpack_entries(task, keys) for task in tasks], list(manifest["density"]))


def entries_at(model: Tensor, positions: Tensor) -> SparseEntries:
    """The model's values at `positions` (flat, ascending), indices stored as int32 when they fit."""
    values = model.reshape(-1).index_select(0, positions.to(model.device))
    return SparseEntries(positions.int() if model.numel() < 2**31 else positions, values)


def _task_entries(keys: Sequence[str], anchor: StateDict, model: Callable[[str], Tensor], recipe: Recipe,
                  t: int, k: int) -> tuple[dict[str, SparseEntries], int]:
    """Task t's k top entries of model − anchor over `keys` (ranked together) per key, and their count."""
    sizes = [anchor[key].numel() for key in keys]
    source = vector_source(keys, anchor.__getitem__, model, recipe, t)
    _, kept, positions = top_positions(source, k, sum(sizes))
    offsets = torch.tensor([0] + sizes, dtype=torch.int64, device=positions.device).cumsum(0)
    bounds = torch.searchsorted(positions, offsets).tolist()  # positions are ascending
    out = {key: entries_at(model(key), positions[bounds[i] : bounds[i + 1]] - offsets[i])
           for i, key in enumerate(keys)}
    return out, kept


def _tasks_entries(keys: Sequence[str], anchor: StateDict, finetuned: Sequence[StateDict],
                   recipe: Recipe) -> list[tuple[dict[str, SparseEntries], int]]:
    """Per task, its kept entries per key (ranked over all of `keys` at once) and their count."""
    total = sum(anchor[key].numel() for key in keys)
    if total == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return [({key: entries_at(model[key], empty) for key in keys}, 0) for model in finetuned]
    k = num_kept(recipe.density, total)
    found = fused_top([anchor[key] for key in keys], [[model[key] for key in keys] for model in finetuned], k, total,
                      positions=True)
    return [
        ({key: SparseEntries(*e) for key, e in zip(keys, f.entries, strict=True)}, f.kept) if f is not None
        else _task_entries(keys, anchor, model.__getitem__, recipe, t, k)
        for t, (model, f) in enumerate(zip(finetuned, found or [None] * len(finetuned), strict=True))
    ]


def compress(anchor: StateDict, finetuned: Sequence[StateDict], density: float, scope: str) -> SparseTaskResult:
    """Per task, keep the top-`density` entries of θ_t − anchor (validated inputs assumed)."""
    recipe = Recipe(density=density, scope=scope)
    keys, total = list(anchor), sum(t.numel() for t in anchor.values())
    groups = [keys] if scope == "global" else [[key] for key in keys]
    entries, kept = [{} for _ in finetuned], [0] * len(finetuned)
    for group in groups:
        for t, (found, n) in enumerate(_tasks_entries(group, anchor, finetuned, recipe)):
            entries[t].update(found)
            kept[t] += n
    entries = [{key: e[key] for key in keys} for e in entries]  # key order of the anchor
    return SparseTaskResult(dict(anchor), entries, [n / total for n in kept])


def merge_step(base: str | Callable, pretrained: StateDict, finetuned: Sequence[StateDict],
               **base_kwargs) -> dict[str, Tensor]:
    """θ* from the registered merger `base` (or a callable); a result object gives its `.merged`."""
    if not callable(base):
        get_method(base)
        if method_inputs(base) != "finetuned":
            raise ValueError(f"base {base!r} merges LoRA factors, not fine-tuned state dicts")
        base = get_method(base)
    merged = base(pretrained, finetuned, **base_kwargs)
    return merged.merged if hasattr(merged, "merged") else merged


def describe_base(base: str | Callable, base_kwargs: Mapping) -> tuple[str, dict]:
    """(name, options) of a base merger given as a name or a functools.partial of a registered one, plus kwargs."""
    options = dict(base_kwargs)
    if isinstance(base, functools.partial):
        options = {**base.keywords, **options}
        base = base.func
    if callable(base):
        base = method_name(base) or getattr(base, "__name__", type(base).__name__)
    return base, options


@register("byom_fft")
def byom_fft(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.1,
             base: str | Callable = "task_arithmetic", scope: str = "global", **base_kwargs) -> SparseTaskResult:
    """BYOM-FFT: merge, then keep per task the top-m% of θ_t − θ* (arXiv 2310.01886).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        density: m as a fraction in (0, 1]: share of the parameters stored per task.
        base: any registered merger of fine-tuned models (default task arithmetic), or a callable
            (pretrained, finetuned) -> state dict, e.g. functools.partial(ties, density=0.2) when
            an option's name collides with one of byom_fft's own.
        scope: "global" ranks each task's whole residual, "tensor" each tensor.
        **base_kwargs: options of the base merger (e.g. lam=0.3).

    Returns:
        SparseTaskResult: `.merged` = θ*, `.task_state_dict(t)` = θ* + top(θ_t − θ*, m).
    """
    check_density(density)
    check_choice(scope, "scope", SCOPES)
    merged = merge_step(base, pretrained, finetuned, **base_kwargs)
    name, options = describe_base(base, base_kwargs)
    return recorded(compress(merged, finetuned, density, scope), "byom_fft", density=density, scope=scope,
                    base=name, base_options=options)


@register("post_pruning")
def post_pruning(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.1,
                 scope: str = "global") -> SparseTaskResult:
    """Post-pruning: θ0 + top(v_t, m) per task, no merging (BYOM's prune-then-merge baseline, arXiv 2310.01886).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        density: m as a fraction in (0, 1].
        scope: "global" or "tensor" ranking.

    Returns:
        SparseTaskResult with `.merged` = θ0.
    """
    check_density(density)
    check_choice(scope, "scope", SCOPES)
    with models_checked(pretrained, finetuned):
        result = compress(pretrained, finetuned, density, scope)
    result.merged = {k: v.clone() for k, v in result.merged.items()}  # θ0 itself is the caller's
    return recorded(result, "post_pruning", density=density, scope=scope)
