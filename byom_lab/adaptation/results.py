"""Results of test-time adaptation: the merged tower θ(λ), the λ it learned, and Model Tinting's per-task heads."""
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..merging.results import TaskExtras


@dataclass
class AdaMergingResult(TaskExtras):
    """One merged image tower θ(λ) = θ0 + Σ_t λ_t,l v_t,l and the λ (tensors × tasks) that built it."""

    kind: ClassVar[str] = "adamerging"
    merged: dict[str, Tensor]
    lambdas: Tensor  # (tensors, tasks), clamped to [0, 1]
    keys: list[str]  # the tensor of each row of `lambdas`
    history: list[float] = field(default_factory=list)  # the training loss at every optimisation step
    info: dict = field(default_factory=dict)  # steps, seconds, images per task, which test images, settings

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return self.lambdas.shape[1]

    def task_state_dict(self, t: int) -> dict[str, Tensor]:
        """The merged tower (the same dict for every task)."""
        self._check_task(t)
        return self.merged

    def task_params(self, t: int) -> int:
        """Nothing is stored per task: λ is folded into the one merged model."""
        return 0

    def task_bytes(self, t: int) -> int:
        """Nothing is stored per task."""
        return 0

    def stored_shared(self) -> dict[str, dict[str, Tensor]]:
        """The shared file: the merged tower."""
        return {"shared": self.merged}

    def stored_task(self, t: int) -> dict[str, Tensor]:
        """Nothing per task."""
        return {}

    def stored_info(self) -> dict:
        """What the manifest records besides tensors: λ (float32 values, exact in JSON), the loss history, the run."""
        return {"lambdas": self.lambdas.tolist(), "history": list(self.history), "run": self.info}

    @classmethod
    def from_stored(cls, shared: dict, tasks: list[dict], manifest: dict):
        """The result from its files' tensors and manifest (inverse of the `stored_*` methods)."""
        extra = {"heads": [task["head"] for task in tasks]} if cls is not AdaMergingResult else {}
        lambdas = torch.tensor(manifest["lambdas"], dtype=torch.float32)
        return cls(shared["shared"], lambdas, list(manifest["keys"]), manifest["history"], manifest["run"], **extra)


@dataclass
class TintingResult(AdaMergingResult):
    """Model Tinting: the merged tower θ(λ) plus one trained classification head per task."""

    kind: ClassVar[str] = "tinting"
    heads: list[Tensor] = field(default_factory=list)  # heads[t]: (n_classes, embed_dim), input L2-normalised

    def task_head(self, t: int) -> Tensor:
        """Task t's trained head, (n_classes, embed_dim); `bl.evaluate` uses it for task t."""
        self._check_task(t)
        return self.heads[t]

    def task_params(self, t: int) -> int:
        """Task t's head plus its column of λ (one per tensor), as Model Tinting counts them."""
        return self.heads[t].numel() + self.lambdas.shape[0]

    def task_bytes(self, t: int) -> int:
        """Bytes of task t's head and λ column."""
        return self.heads[t].nbytes + self.lambdas[:, t].numel() * self.lambdas.element_size()

    def stored_task(self, t: int) -> dict[str, Tensor]:
        """The tensors of task t's file: its head (the λ column lives in the shared λ file)."""
        return {"head": self.heads[t].contiguous()}
