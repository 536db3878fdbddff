"""Memoised predictions: what a model predicts on a task's split, kept in the cache under a content digest.

The key is a sha256 over everything the predictions depend on: every tensor of the state dict
(keys, dtypes, shapes and bytes), the classification head, the images and labels of the split,
how many of them are read, and how the forward runs (its version, device kind and precision).
A repeated evaluation is then a lookup, and a model that differs in a single bit is a miss by
construction. Entries are written atomically under a lock (byom_lab.cache); an unreadable entry
is recomputed with a warning. `BYOM_LAB_MEMO=0` turns the memo off.
"""
import hashlib
import io
import json
import os

import numpy as np
import torch

from . import cache

FORWARD_VERSION = "vit-cls-1"  # bump when the evaluation forward changes what it computes


def enabled() -> bool:
    """Whether evaluations are memoised (set BYOM_LAB_MEMO=0 to turn it off)."""
    return os.environ.get("BYOM_LAB_MEMO", "1") != "0"


def _update(h, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into the hash `h`."""
    t = tensor.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    t = t.to("cpu").contiguous()
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))


def state_digest(state_dict: dict) -> str:
    """sha256 of a state dict's keys, dtypes, shapes and values (key order does not matter)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode() + b"\0")
        _update(h, state_dict[key])
    return h.hexdigest()


def tensors_digest(*tensors: torch.Tensor) -> str:
    """sha256 of a few tensors (a head, images and labels), in order."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def key(**parts) -> str:
    """One digest of the parts of a memo key (JSON-able values)."""
    return hashlib.sha256(json.dumps({"forward": FORWARD_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


def _save(tmp, predictions: torch.Tensor) -> None:
    buf = io.BytesIO()
    np.save(buf, predictions.numpy().astype(np.int32), allow_pickle=False)
    tmp.write_bytes(buf.getvalue())


def _load(path) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.from_numpy(np.load(f, allow_pickle=False)).long()


def predictions(memo_key: str, compute) -> torch.Tensor:
    """compute() once per key (predicted class indices), then read back from the cache."""
    if not enabled():
        return compute()
    path = cache.home() / "predictions" / memo_key[:2] / f"{memo_key}.npy"
    return cache.cached(path, lambda tmp: _save(tmp, compute()), _load)
