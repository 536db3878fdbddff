"""What a suite is: a backbone, its tasks (data, heads) and one full + one LoRA fine-tune per task."""
from dataclasses import dataclass, field
from typing import Callable

import torch

from .model import preprocess

SPLITS = ("train", "val", "test")
MAX_CACHED_INPUT_BYTES = 512 * 2**20  # splits larger than this stay uint8 and are normalised batch by batch


@dataclass
class Suite:
    """A backbone + tasks + fine-tuned checkpoints (see DESIGN.md, "Two suites, one API")."""

    name: str
    tasks: list
    pretrained: dict
    finetuned: list
    lora: list
    heads: list
    data: dict
    visual: torch.nn.Module
    logit_scale: float
    classes: list
    info: dict = field(default_factory=dict)
    normalize: Callable = preprocess  # uint8 images -> model inputs
    _inputs: dict = field(default_factory=dict, repr=False)
    _reference: dict = field(default_factory=dict, repr=False)

    def task_index(self, task) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"task index {task} out of range 0..{len(self.tasks) - 1}")
            return task
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r} in suite {self.name!r}; tasks: {self.tasks}")
        return self.tasks.index(task)

    def inputs(self, task, split: str):
        """Preprocessed float images and labels of a task's split (kept; large splits stay uint8)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
        key = (self.tasks[self.task_index(task)], split)
        if key not in self._inputs:
            x, y = self.data[key[0]][split]
            small = x.numel() * 4 <= MAX_CACHED_INPUT_BYTES  # else normalised batch by batch when used
            self._inputs[key] = (self.normalize(x) if small else x, y)
        return self._inputs[key]
