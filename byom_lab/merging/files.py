"""Registered methods over checkpoint files, streamed tensor by tensor, written as BYOM directories.

BYOM-FFT and post-pruning keep per task the top-m% of θ_t − anchor. Global top-m% needs a task's
threshold over all its tensors before any entry is kept, so each task takes two passes over the
files: a selection pass finds the exact threshold (`kth_largest_magnitude` over the residual, read
tensor by tensor), then a write pass keeps the entries at or above it. The anchor is θ0
(post-pruning) or θ* (BYOM-FFT), which is merged from the files into the output's shared-model
file first and read back from there. Extra memory: a few tensors plus one task's kept entries,
whatever T. The tensors equal those of the in-memory `byom_fft` / `post_pruning` results, bit for bit.
"""
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .checks import check_choice, check_density
from .family import RECIPES, family_recipe
from .general import Recipe, vector_chunks, vector_source
from .select import SCOPES, kth_largest_magnitude, num_kept, shrink_level
from .sparse import SparseEntries, SparseTaskResult, describe_base, entries_at, entries_nbytes, pack_entries
from .storage import MERGED, SHARED, atomic_dir, result_manifest, save_tensors, task_names, task_path, write_manifest
from .streaming import Layout, Progress, SafetensorsFile, TensorFile, as_tensor_file, check_layouts, layout_nbytes
from .streaming import merge_files, ticking, write_streamed

Source = str | os.PathLike | TensorFile  # a safetensors path, or any reader with .name, .layout, .get(key)
FAMILY = (*RECIPES, "dare")  # the general mechanism's methods, merged by `merge_files`


def streams(method: str, base: "str | Callable" = "task_arithmetic") -> bool:
    """Whether `method` (for BYOM-FFT, with this base merger) runs streamed from files here."""
    if method == "byom_fft":
        return describe_base(base, {})[0] in FAMILY
    return method in (*FAMILY, "post_pruning")


def _kept_entries(anchor: TensorFile, model: TensorFile, keys: Sequence[str], sizes: Mapping[str, int],
                  recipe: Recipe, t: int) -> dict[str, SparseEntries]:
    """Task t's entries over `keys` (ranked together): selection pass for the threshold, then write pass."""
    total = sum(sizes[key] for key in keys)
    level = 0.0
    if total:
        source = vector_source(keys, anchor.get, model.get, recipe, t)
        threshold, _ = kth_largest_magnitude(source, num_kept(recipe.density, total), total)
        level = shrink_level(threshold)  # |u| > level  <=>  |u| >= threshold (u != 0 for a zero threshold)
    out = {}
    for key in keys:
        base, tensor = anchor.get(key), model.get(key)
        offset, positions = 0, [torch.zeros(0, dtype=torch.int64)]
        for u in vector_chunks(base, tensor, recipe, t, key):  # (chunk,) of θ_t − anchor, as ranked
            positions.append((u.abs() > level).nonzero().squeeze(1) + offset)
            offset += u.numel()
        out[key] = entries_at(tensor, torch.cat(positions))
    return out


def _write_tasks(anchor: TensorFile, models: Sequence[TensorFile], layout: Layout, density: float, scope: str,
                 directory: Path, names: Sequence[str], progress: Progress | None) -> dict[str, list]:
    """Write each task's file of kept entries, one task at a time; per task its density, count and bytes."""
    sizes = {key: torch.Size(shape).numel() for key, (_, shape) in layout.items()}
    groups = [list(layout)] if scope == "global" else [[key] for key in layout]
    recipe = Recipe(density=density, scope=scope)
    stats = {"density": [], "params": [], "bytes": []}
    for t, (model, name) in enumerate(zip(models, names, strict=True)):
        entries = {}
        for group in groups:
            entries.update(ticking(_kept_entries(anchor, model, group, sizes, recipe, t).items(), progress,
                                   f"{name}: "))
        save_tensors(pack_entries(entries), task_path(directory, name))
        kept = sum(e.values.numel() for e in entries.values())
        stats["density"].append(kept / sum(sizes.values()))
        stats["params"].append(kept)
        stats["bytes"].append(entries_nbytes(entries))
    return stats


def _sparse_files(method: str, hyperparameters: dict, write_anchor: Callable[[Path], Path], pretrained: TensorFile,
                  finetuned: Sequence[TensorFile], out, tasks, overwrite: bool, inputs, progress) -> Path:
    """Write the anchor (`write_anchor(path)`), then every task's kept entries, then the manifest."""
    layout = check_layouts(pretrained, finetuned)
    names = task_names(tasks, len(finetuned))
    with atomic_dir(out, overwrite) as tmp:
        anchor = SafetensorsFile(write_anchor(tmp / f"{SHARED}.safetensors"))
        stats = _write_tasks(anchor, finetuned, layout, hyperparameters["density"], hyperparameters["scope"], tmp,
                             names, progress)
        size = layout_nbytes(layout)
        write_manifest(tmp, result_manifest(
            method=method, kind=SparseTaskResult.kind, hyperparameters=hyperparameters, tasks=names, keys=list(layout),
            shared=[SHARED], model_bytes=size, shared_bytes=size, params=stats["params"], task_bytes=stats["bytes"],
            info={"density": stats["density"]}, inputs=inputs))
    return Path(out)


def byom_fft_files(pretrained: Source, finetuned: Sequence[Source], out: str | os.PathLike, density: float = 0.1,
                   base: "str | Callable" = "task_arithmetic", scope: str = "global",
                   tasks: Sequence[str] | None = None, overwrite: bool = False, inputs: Mapping | None = None,
                   progress: Progress | None = None, **base_kwargs) -> Path:
    """BYOM-FFT from checkpoint files into a BYOM directory, streamed (arXiv 2310.01886).

    Args:
        pretrained: θ0 as a safetensors file (or a reader with .name, .layout, .get(key)).
        finetuned: one file (or reader) per task, with θ0's keys, shapes and dtypes.
        out: the result directory to create (as `byom_fft(...).save(out)` writes it).
        density: m as a fraction in (0, 1].
        base: a merger of the task-arithmetic family by name, or functools.partial of one with its options.
        scope: "global" or "tensor" ranking.
        tasks: task names (default task0, task1, ...).
        overwrite: replace an existing result directory.
        inputs: what went in, recorded in the manifest.
        progress: called with a label after each tensor is written.
        **base_kwargs: options of the base merger (e.g. lam=0.3).

    Returns:
        out as a Path.
    """
    check_density(density)
    check_choice(scope, "scope", SCOPES)
    name, options = describe_base(base, base_kwargs)
    if name not in FAMILY:
        raise ValueError(f"streamed BYOM-FFT merges with {', '.join(FAMILY)}; base {name!r} needs the in-memory "
                         f"byom_fft")
    pre, fts = as_tensor_file(pretrained), [as_tensor_file(f) for f in finetuned]
    recipe = family_recipe(name, len(fts), **options)
    return _sparse_files(
        "byom_fft", {"density": density, "scope": scope, "base": name, "base_options": options},
        lambda path: merge_files(pre, fts, path, recipe, ticking_label(progress, "merged: ")),
        pre, fts, out, tasks, overwrite, inputs, progress)


def post_pruning_files(pretrained: Source, finetuned: Sequence[Source], out: str | os.PathLike, density: float = 0.1,
                       scope: str = "global", tasks: Sequence[str] | None = None, overwrite: bool = False,
                       inputs: Mapping | None = None, progress: Progress | None = None) -> Path:
    """Post-pruning from checkpoint files into a BYOM directory, streamed (θ0 + top(v_t, m), arXiv 2310.01886).

    Args:
        pretrained: θ0 as a safetensors file (or a reader with .name, .layout, .get(key)).
        finetuned: one file (or reader) per task, with θ0's keys, shapes and dtypes.
        out: the result directory to create (as `post_pruning(...).save(out)` writes it).
        density: m as a fraction in (0, 1].
        scope: "global" or "tensor" ranking.
        tasks, overwrite, inputs, progress: as in `byom_fft_files`.
    """
    check_density(density)
    check_choice(scope, "scope", SCOPES)
    pre, fts = as_tensor_file(pretrained), [as_tensor_file(f) for f in finetuned]
    pairs = ((key, pre.get(key)) for key in pre.layout)
    return _sparse_files(
        "post_pruning", {"density": density, "scope": scope},
        lambda path: write_streamed(path, pre.layout, ticking(pairs, progress, "pretrained: ")),
        pre, fts, out, tasks, overwrite, inputs, progress)


def family_files(method: str, pretrained: Source, finetuned: Sequence[Source], out: str | os.PathLike,
                 tasks: Sequence[str] | None = None, overwrite: bool = False, inputs: Mapping | None = None,
                 progress: Progress | None = None, **options) -> Path:
    """A merger of the task-arithmetic family (DARE included) from checkpoint files into a BYOM directory, streamed.

    Args:
        method: "simple_average", "task_arithmetic", "ties" or "dare".
        pretrained, finetuned, out, tasks, overwrite, inputs, progress: as in `byom_fft_files`.
        **options: the method's options (e.g. lam=0.3).
    """
    pre, fts = as_tensor_file(pretrained), [as_tensor_file(f) for f in finetuned]
    recipe = family_recipe(method, len(fts), **options)
    layout = check_layouts(pre, fts)
    names = task_names(tasks, len(fts))
    with atomic_dir(out, overwrite) as tmp:
        merge_files(pre, fts, tmp / f"{SHARED}.safetensors", recipe, progress)
        size = layout_nbytes(layout)
        write_manifest(tmp, result_manifest(
            method=method, kind=MERGED, hyperparameters=options, tasks=names, keys=list(layout), shared=[SHARED],
            model_bytes=size, shared_bytes=size, params=[], task_bytes=[], inputs=inputs))
    return Path(out)


def ticking_label(progress: Progress | None, prefix: str) -> Progress | None:
    """`progress` with `prefix` put before every label."""
    return None if progress is None else (lambda label: progress(prefix + label))
