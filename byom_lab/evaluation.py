"""Accuracy of state dicts on a suite's tasks: per task, normalised by the fine-tuned model."""
import os

import pandas as pd
import torch

from . import forward, memo
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


CPU_BATCH, GPU_BATCH = 100, 1000  # images per forward: small batches keep a CPU forward's activations in cache


def _data_digest(suite, task: int, split: str) -> str:
    """Digest of a task split's raw images and labels, and of how they are normalised (kept on the suite)."""
    digests = suite.__dict__.setdefault("_digests", {})
    if (task, split) not in digests:
        x, y = suite.data[suite.tasks[task]][split]
        norm = getattr(suite.normalize, "__qualname__", None) or repr(suite.normalize)
        digests[task, split] = memo.key(data=memo.tensors_digest(x, y), normalize=norm)
    return digests[task, split]


def _head(suite, t: int, head=None) -> torch.Tensor:
    return suite.heads[t] if head is None else head


@torch.inference_mode()
def _predict(suite, state_dict: dict, t: int, split: str, limit, head, batch_size) -> torch.Tensor:
    x, _ = suite.inputs(t, split)
    if limit is not None:
        x = x[:limit]
    device = eval_device()
    if device.type != "cpu":
        state_dict = {k: v.to(device, non_blocking=True) for k, v in state_dict.items()}
    head = head.to(device)
    visual = suite.visual.to(device)
    size = batch_size or (CPU_BATCH if device.type == "cpu" else GPU_BATCH)
    fast = forward.supports(visual)
    out = []
    for i in range(0, len(x), size):
        xb = x[i:i + size]
        xb = suite.normalize(xb) if xb.dtype == torch.uint8 else xb
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if fast:
                feats = torch.nn.functional.normalize(forward.image_features(visual, state_dict, xb.to(device)), dim=-1)
            else:
                feats = encode_images(visual, xb.to(device), state_dict)
        out.append((feats.float() @ head.T).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def predictions(suite, state_dict: dict, task, split: str = "test", batch_size: int = None, limit: int = None,
                head: torch.Tensor = None, digest: str = None):
    """Predicted class indices and true labels of one task's split (its first `limit` images) under state_dict.

    `head` replaces the task's zero-shot head (a method that trains one, e.g. Model Tinting). Results
    are memoised in the cache under a digest of the weights, head, images and settings (byom_lab.memo);
    `digest` is `memo.state_digest(state_dict)` when the caller has it already.
    """
    t = suite.task_index(task)
    _, y = suite.inputs(t, split)
    if limit is not None:
        y = y[:limit]
    w = _head(suite, t, head)
    device = eval_device()
    parts = dict(model=digest or memo.state_digest(state_dict), head=memo.tensors_digest(w), data=_data_digest(suite, t, split),
                 limit=limit, device=device.type, precision="bf16" if device.type == "cuda" else "fp32")
    pred = memo.predictions(memo.key(**parts), lambda: _predict(suite, state_dict, t, split, limit, w, batch_size))
    return pred, y


def eval_device() -> torch.device:
    """The GPU when one is present (override with BYOM_LAB_DEVICE), else the CPU."""
    name = os.environ.get("BYOM_LAB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def accuracy(suite, state_dict: dict, task, split: str = "test", limit: int = None, head=None, digest=None) -> float:
    """Share of a task split's images (its first `limit`) that state_dict (with `head`, default the zero-shot one) classifies right."""
    pred, y = predictions(suite, state_dict, task, split, limit=limit, head=head, digest=digest)
    return float((pred == y).float().mean())


def _per_task_models(suite, models) -> list:
    """Normalise the accepted model forms to one state dict per task (lazily for results)."""
    n = len(suite.tasks)
    if hasattr(models, "task_state_dict"):
        if getattr(models, "num_tasks", n) != n:
            raise ValueError(f"the merging result holds {models.num_tasks} tasks, suite {suite.name!r} has {n}")
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
            (task t uses result.task_state_dict(t), and result.task_head(t) when the result has one).
        split: "train", "val" or "test".
        tasks: optional subset of task names or indices.
    """
    per_task = _per_task_models(suite, models)
    idx = range(len(suite.tasks)) if tasks is None else [suite.task_index(t) for t in tasks]
    ref = reference_accuracy(suite, split)
    heads = getattr(models, "task_head", None)
    digests = {}  # one digest per distinct state dict object of this call
    rows = []
    for t in idx:
        sd = per_task[t]()
        if id(sd) not in digests:
            digests[id(sd)] = (sd, memo.state_digest(sd))  # the object is held, so its id is not reused
        acc = accuracy(suite, sd, t, split, head=heads(t) if heads else None, digest=digests[id(sd)][1])
        rows.append({"task": suite.tasks[t], "accuracy": acc, "normalized_accuracy": acc / ref[t] if ref[t] else float("nan")})
    return pd.DataFrame(rows, columns=["task", "accuracy", "normalized_accuracy"])
