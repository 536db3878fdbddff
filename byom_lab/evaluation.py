"""Accuracy of state dicts on a suite's tasks: per task, normalised by the fine-tuned model."""
import os

import pandas as pd
import torch

from .model import encode_images


def check_fits(suite, state_dict: dict, what: str = "state dict") -> None:
    """ValueError naming the first key or shape that does not fit the suite's image tower."""
    ref = suite.pretrained
    missing = [k for k in ref if k not in state_dict]
    if missing:
        raise ValueError(f"{what} does not fit suite {suite.name!r}: missing key {missing[0]!r}")
    extra = [k for k in state_dict if k not in ref]
    if extra:
        raise ValueError(f"{what} does not fit suite {suite.name!r}: unexpected key {extra[0]!r}")
    for k, v in ref.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(f"{what} does not fit suite {suite.name!r}: key {k!r} has shape "
                             f"{tuple(state_dict[k].shape)}, the backbone expects {tuple(v.shape)}")


@torch.inference_mode()
def predictions(suite, state_dict: dict, task, split: str = "test", batch_size: int = 1000, limit: int = None):
    """Predicted class indices and true labels of one task's split (its first `limit` images) under state_dict."""
    t = suite.task_index(task)
    x, y = suite.inputs(t, split)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    device = eval_device()
    if device.type != "cpu":
        state_dict = {k: v.to(device, non_blocking=True) for k, v in state_dict.items()}
    head = suite.heads[t].to(device)
    visual = suite.visual.to(device)
    out = []
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size]
        xb = suite.normalize(xb) if xb.dtype == torch.uint8 else xb
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats = encode_images(visual, xb.to(device), state_dict)
        out.append((feats.float() @ head.T).argmax(1).cpu())
    return torch.cat(out), y


def eval_device() -> torch.device:
    """The GPU when one is present (override with BYOM_LAB_DEVICE), else the CPU."""
    name = os.environ.get("BYOM_LAB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def accuracy(suite, state_dict: dict, task, split: str = "test", limit: int = None) -> float:
    pred, y = predictions(suite, state_dict, task, split, limit=limit)
    return float((pred == y).float().mean())


def _per_task_models(suite, models) -> list:
    """Normalise the accepted model forms to one state dict per task (lazily for results)."""
    n = len(suite.tasks)
    if hasattr(models, "task_state_dict"):
        return [lambda t=t: models.task_state_dict(t) for t in range(n)]
    if isinstance(models, dict):
        check_fits(suite, models)
        return [lambda: models] * n
    if isinstance(models, (list, tuple)):
        if len(models) != n:
            raise ValueError(f"got {len(models)} state dicts for suite {suite.name!r} with {n} tasks")
        for t, m in enumerate(models):
            check_fits(suite, m, f"state dict for task {suite.tasks[t]!r}")
        return [lambda m=m: m for m in models]
    raise TypeError(f"models must be a state dict, a list of {n} state dicts or a merging result, "
                    f"not {type(models).__name__}")


def reference_accuracy(suite, split: str = "test") -> list:
    """Accuracy of each task's own fully fine-tuned model (kept on the suite)."""
    if split not in suite._reference:
        suite._reference[split] = [accuracy(suite, suite.finetuned[t], t, split) for t in range(len(suite.tasks))]
    return suite._reference[split]


def evaluate(suite, models, split: str = "test", tasks=None) -> pd.DataFrame:
    """One row per task: task, accuracy, normalized_accuracy (÷ the task's fine-tuned accuracy).

    Args:
        suite: a loaded Suite.
        models: one state dict (every task), a list of one per task, or a merging result
            (task t uses result.task_state_dict(t)).
        split: "train", "val" or "test".
        tasks: optional subset of task names or indices.
    """
    per_task = _per_task_models(suite, models)
    idx = range(len(suite.tasks)) if tasks is None else [suite.task_index(t) for t in tasks]
    ref = reference_accuracy(suite, split)
    rows = []
    for t in idx:
        acc = accuracy(suite, per_task[t](), t, split)
        rows.append({"task": suite.tasks[t], "accuracy": acc, "normalized_accuracy": acc / ref[t] if ref[t] else float("nan")})
    return pd.DataFrame(rows, columns=["task", "accuracy", "normalized_accuracy"])
