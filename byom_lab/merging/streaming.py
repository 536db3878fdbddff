"""Merging checkpoints stored as safetensors files, tensor by tensor.

Each tensor is read with `safe_open` when it is needed and dropped after use; the output is
written tensor by tensor into a temporary file in the target directory, then renamed over the
target (`os.replace`), so a crash never leaves a half-written checkpoint. Tasks are folded in one
at a time per tensor, so extra memory is a few times the largest tensor whatever the number of
tasks T, instead of T checkpoints. Wherever a path is taken, any `TensorFile` (a reader with
`.name`, `.layout` and `.get(key)`) may stand in: `byom_lab.tower_files` reads HF CLIP folders so.
A missing, damaged or truncated file is named before anything is written.
"""
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from .checks import check_tensor
from .general import Recipe, merge_getters

_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
Layout = dict[str, tuple[str, tuple[int, ...]]]  # key -> (safetensors dtype name, shape)
Progress = Callable[[str], None]  # called with a label after each tensor is done


def layout_nbytes(layout: Layout) -> int:
    """Bytes of the tensors a float layout describes."""
    return sum(torch.Size(shape).numel() * _NAME_DTYPES[dtype].itemsize for dtype, shape in layout.values())


def read_header(path: str | os.PathLike) -> Layout:
    """{key: (dtype name, shape)} of a safetensors file, read without loading any tensor.

    A missing, damaged or truncated file raises FileNotFoundError / ValueError naming it.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = f.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else None
        if length is None or 8 + length > size:
            raise ValueError(f"{path} is truncated or not a safetensors file: its {size} bytes cannot hold "
                             f"the header it announces")
        try:
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            layout = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
            end = max((v["data_offsets"][1] for v in header.values()), default=0)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path} is not a safetensors file: its header cannot be read") from None
    if 8 + length + end > size:
        raise ValueError(f"{path} is truncated: its header announces {end} bytes of tensors but the file "
                         f"holds {size - 8 - length}")
    return layout


class TensorFile(Protocol):
    """A checkpoint read key by key: `name` for messages, `layout` of its tensors, `get(key)`."""

    name: str
    layout: Layout

    def get(self, key: str) -> Tensor:
        """One tensor, read when asked."""


class SafetensorsFile:
    """A plain safetensors file as a TensorFile: the layout from its header, tensors one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.name = Path(path), str(path)
        self.layout = read_header(path)

    def get(self, key: str) -> Tensor:
        """One tensor of the file (checked floating-point and finite)."""
        return read_tensor(self.path, key)


def as_tensor_file(source: "str | os.PathLike | TensorFile") -> TensorFile:
    """A TensorFile as is; a path as a SafetensorsFile."""
    return source if hasattr(source, "get") and hasattr(source, "layout") else SafetensorsFile(source)


def ticking(pairs: Iterable[tuple[str, Tensor]], progress: Progress | None,
            label: str = "") -> Iterator[tuple[str, Tensor]]:
    """The (key, tensor) pairs, calling `progress(label + key)` after each."""
    for key, tensor in pairs:
        yield key, tensor
        if progress is not None:
            progress(label + key)


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
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are ordinary files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def check_layouts(pretrained: TensorFile, finetuned: Sequence[TensorFile]) -> Layout:
    """The pretrained layout, after checking that every file has the same keys, shapes and float dtypes."""
    if not finetuned:
        raise ValueError("finetuned_paths must list at least one checkpoint")
    layout = pretrained.layout
    if not layout:
        raise ValueError(f"{pretrained.name} holds no tensors to merge")
    for key, (dtype, _) in layout.items():
        if dtype not in _NAME_DTYPES:
            raise ValueError(f"{pretrained.name} key {key!r} has dtype {dtype}; merging needs F16/BF16/F32/F64")
    for model in finetuned:
        other = model.layout
        for key, (dtype, shape) in layout.items():
            if key not in other:
                raise ValueError(f"{model.name} is missing key {key!r} (present in pretrained)")
            if other[key] != (dtype, shape):
                hint = ("different architectures cannot be merged" if other[key][1] != shape
                        else "convert every checkpoint to one dtype first")
                raise ValueError(f"{model.name} key {key!r} is {other[key][0]} {other[key][1]} "
                                 f"but pretrained is {dtype} {shape}: {hint}")
        extra = sorted(set(other) - set(layout))
        if extra:
            raise ValueError(f"{model.name} has key {extra[0]!r} that pretrained lacks "
                             f"(different architectures cannot be merged)")
    return layout


def merge_files(pretrained_path: "str | os.PathLike | TensorFile",
                finetuned_paths: Sequence["str | os.PathLike | TensorFile"], out_path: str | os.PathLike,
                recipe: Recipe | None = None, progress: Progress | None = None) -> Path:
    """Merge safetensors checkpoints with the general mechanism, streaming tensor by tensor.

    Args:
        pretrained_path: θ0 as a safetensors file (or any TensorFile).
        finetuned_paths: one safetensors file (or TensorFile) per task, with θ0's keys, shapes and dtypes.
        out_path: where the merged checkpoint is written (atomically).
        recipe: the options of the general mechanism (task arithmetic, TIES, DARE, ...);
            default Recipe(), the plain sum of task vectors.
        progress: called with the key after each merged tensor is written.

    Returns:
        out_path as a Path.
    """
    pretrained, finetuned = as_tensor_file(pretrained_path), [as_tensor_file(p) for p in finetuned_paths]
    layout = check_layouts(pretrained, finetuned)
    recipe = Recipe() if recipe is None else recipe
    total = sum(torch.Size(shape).numel() for _, shape in layout.values())
    merged = merge_getters(list(layout), pretrained.get, [f.get for f in finetuned], recipe, total=total,
                           task_major=True)
    return write_streamed(out_path, layout, ticking(merged, progress))


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
