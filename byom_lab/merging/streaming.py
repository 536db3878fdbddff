"""Merging checkpoints stored as safetensors files, tensor by tensor.

Each tensor is read with `safe_open` when it is needed and dropped after use; the output is
written tensor by tensor into a temporary file in the target directory, then renamed over the
target (`os.replace`), so a crash never leaves a half-written checkpoint. Tasks are folded in one
at a time per tensor, so extra memory is a few times the largest tensor whatever the number of
tasks T, instead of T checkpoints.
"""
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from .checks import check_tensor
from .general import Recipe, merge_getters

_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def read_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype name, shape)} of a safetensors file, read without loading any tensor."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def read_tensor(path: str | os.PathLike, key: str) -> Tensor:
    """One tensor of a safetensors file (the file is opened, read from and closed)."""
    with safe_open(str(path), framework="pt") as f:
        tensor = f.get_tensor(key)
    check_tensor(tensor, f"{path} key {key!r}")
    return tensor


def write_streamed(path: str | os.PathLike, layout: dict[str, tuple[str, tuple[int, ...]]],
                   tensors: Iterable[tuple[str, Tensor]]) -> Path:
    """Write (key, tensor) pairs, in `layout` order, as a safetensors file; atomically."""
    path, offsets, start = Path(path), {}, 0
    for key, (dtype, shape) in layout.items():
        size = torch.Size(shape).numel() * _NAME_DTYPES[dtype].itemsize
        offsets[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + size]}
        start += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **offsets}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for (key, tensor), expected in zip(tensors, layout, strict=True):
                if key != expected:
                    raise ValueError(f"tensor {key!r} arrived where {expected!r} was expected")
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _check_layouts(pretrained_path, finetuned_paths) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The pretrained layout, after checking that every file has the same keys, shapes and float dtypes."""
    if not finetuned_paths:
        raise ValueError("finetuned_paths must list at least one checkpoint")
    layout = read_header(pretrained_path)
    for key, (dtype, _) in layout.items():
        if dtype not in _NAME_DTYPES:
            raise ValueError(f"{pretrained_path} key {key!r} has dtype {dtype}; merging needs F16/BF16/F32/F64")
    for path in finetuned_paths:
        other = read_header(path)
        for key, (dtype, shape) in layout.items():
            if key not in other:
                raise ValueError(f"{path} is missing key {key!r} (present in pretrained)")
            if other[key] != (dtype, shape):
                raise ValueError(f"{path} key {key!r} is {other[key][0]} {other[key][1]} "
                                 f"but pretrained is {dtype} {shape}")
        extra = sorted(set(other) - set(layout))
        if extra:
            raise ValueError(f"{path} has key {extra[0]!r} that pretrained lacks")
    return layout


def merge_files(pretrained_path: str | os.PathLike, finetuned_paths: Sequence[str | os.PathLike],
                out_path: str | os.PathLike, recipe: Recipe | None = None) -> Path:
    """Merge safetensors checkpoints with the general mechanism, streaming tensor by tensor.

    Args:
        pretrained_path: θ0 as a safetensors file.
        finetuned_paths: one safetensors file per task, with θ0's keys, shapes and dtypes.
        out_path: where the merged checkpoint is written (atomically).
        recipe: the options of the general mechanism (task arithmetic, TIES, DARE, ...);
            default Recipe(), the plain sum of task vectors.

    Returns:
        out_path as a Path.
    """
    layout = _check_layouts(pretrained_path, finetuned_paths)
    recipe = Recipe() if recipe is None else recipe
    base = lambda key: read_tensor(pretrained_path, key)  # noqa: E731
    models = [lambda key, p=p: read_tensor(p, key) for p in finetuned_paths]
    total = sum(torch.Size(shape).numel() for _, shape in layout.values())
    return write_streamed(out_path, layout, merge_getters(list(layout), base, models, recipe, total=total,
                                                                task_major=True))


def task_arithmetic_files(pretrained_path: str | os.PathLike, finetuned_paths: Sequence[str | os.PathLike],
                          out_path: str | os.PathLike, lam: float = 0.3) -> Path:
    """Task arithmetic θ0 + λ Σ v_t over safetensors files, streamed (arXiv 2212.04089).

    Args:
        pretrained_path: θ0 as a safetensors file.
        finetuned_paths: one safetensors file per task.
        out_path: where the merged checkpoint is written (atomically).
        lam: scaling coefficient λ.
    """
    return merge_files(pretrained_path, finetuned_paths, out_path, Recipe(lam=lam))


def ties_files(pretrained_path: str | os.PathLike, finetuned_paths: Sequence[str | os.PathLike],
               out_path: str | os.PathLike, density: float = 0.2, lam: float = 1.0, scope: str = "global",
               merge: str = "mean") -> Path:
    """TIES-Merging over safetensors files, streamed (arXiv 2306.01708).

    Args:
        pretrained_path: θ0 as a safetensors file.
        finetuned_paths: one safetensors file per task.
        out_path: where the merged checkpoint is written (atomically).
        density: fraction of each task vector kept, in (0, 1].
        lam: scale λ.
        scope: "global" or "tensor" ranking.
        merge: "mean" or "sum" over agreeing tasks.
    """
    recipe = Recipe(lam=lam, density=density, scope=scope, consensus=True, merge=merge)
    return merge_files(pretrained_path, finetuned_paths, out_path, recipe)
