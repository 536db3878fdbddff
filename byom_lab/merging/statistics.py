"""Per-model statistics that Fisher merging and RegMean take, and the checks that they fit the models.

A statistic is computed from one fine-tuned model θ_t on its task's training images (by
`byom_lab.adaptation.statistics`); the merge formulas here stay pure and only read it. A
`ModelStatistics` records which weights it came from (`model`: `memo.state_digest(θ_t)`), so
statistics of one model handed in for another are caught; plain dicts are accepted unchecked.
"""
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from torch import Tensor

from ..memo import state_digest
from .checks import check_tensor

KINDS = ("fisher", "gram")


@dataclass
class ModelStatistics:
    """One model's statistics: `tensors[key]` (a diagonal Fisher per weight, or a Gram per linear weight)."""

    kind: str  # "fisher" or "gram"
    tensors: dict[str, Tensor]
    model: str | None = None  # sha256 of the model's state dict (byom_lab.memo.state_digest)
    images: int = 0  # training images the statistic was computed from
    info: dict = field(default_factory=dict)  # how it was computed (batch size, split, ...)


def statistic_tensors(stats, kind: str, name: str, model: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
    """The tensors of `stats` (a ModelStatistics or a plain dict), checked to be `kind` and to come from `model`."""
    if isinstance(stats, ModelStatistics):
        if stats.kind != kind:
            raise ValueError(f"{name} holds {stats.kind} statistics; this merge needs {kind} statistics")
        if stats.model is not None and model is not None and stats.model != state_digest(model):
            raise ValueError(f"{name} were computed from another model (digest {stats.model[:12]}…), "
                             f"not from the fine-tuned model they are paired with; recompute them for that model")
        stats = stats.tensors
    if not isinstance(stats, Mapping) or not stats:
        raise ValueError(f"{name} must be a non-empty dict of tensors or a ModelStatistics, got {type(stats).__name__}")
    for key, tensor in stats.items():
        check_tensor(tensor, f"{name} key {key!r}")
    return stats


def check_statistics(statistics: Sequence, finetuned: Sequence, kind: str, name: str) -> list[Mapping[str, Tensor]]:
    """One checked tensor dict per fine-tuned model; a clear error for a missing or foreign statistic."""
    if isinstance(statistics, Mapping) or not isinstance(statistics, Sequence):
        raise ValueError(f"{name} must be a list with one statistic per fine-tuned model")
    if len(statistics) != len(finetuned):
        raise ValueError(f"got {len(statistics)} {name} for {len(finetuned)} fine-tuned models: "
                         f"a statistic is missing (one per model, in task order)")
    return [statistic_tensors(s, kind, f"{name}[{t}]", m) for t, (s, m) in enumerate(zip(statistics, finetuned))]
