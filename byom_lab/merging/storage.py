"""BYOM files: a merging result as a directory of safetensors files and a JSON manifest with checksums.

    merged/
      manifest.json             method, hyperparameters, tasks, realised densities, bytes per task,
                                the sha256 of every file (and of the inputs, when given)
      shared.safetensors        the shared model (EMR: pretrained.safetensors + unified.safetensors)
      tasks/<task>.safetensors  one small file per task: each result's `stored_task(t)`

A plain merger's state dict is stored as shared.safetensors alone. Everything is written into a
temporary directory beside the target and renamed into place at the end, so a failed run leaves
nothing behind; `load_result` checks every sha256 before it reads a tensor.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from safetensors.torch import load_file, save_file
from torch import Tensor

from .results import TaskExtras

MANIFEST = "manifest.json"
SHARED = "shared"  # file stem of the shared model
FORMAT = "byom-lab result"
VERSION = 1
MERGED = "merged"  # kind of a plain merger's state dict
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_replaceable(final: str | os.PathLike, overwrite: bool = False, marker: str = MANIFEST) -> None:
    """Raise unless `final` is absent, or may be replaced: `overwrite` and an empty folder or one holding `marker`."""
    final = Path(final)
    if not final.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{final} already exists; pass --force (or overwrite=True) to replace it")
    if not final.is_dir() or (any(final.iterdir()) and not (final / marker).exists()):
        raise FileExistsError(f"{final} exists and is not a folder this command wrote (no {marker}); "
                              f"refusing to replace it")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False, marker: str = MANIFEST) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    An existing `final` is an error unless `overwrite`, and even then only an empty folder or one
    holding `marker` (what this writer writes) is replaced.
    """
    final = Path(final)
    check_replaceable(final, overwrite, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        check_replaceable(final, overwrite, marker)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; results are ordinary folders
        old = tmp.with_suffix(".old") if final.exists() else None
        if old is not None:
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def task_names(tasks: Sequence[str] | None, count: int) -> list[str]:
    """The task names (default task0, task1, ...), checked: `count` of them, distinct, usable as file names."""
    names = [f"task{t}" for t in range(count)] if tasks is None else [str(name) for name in tasks]
    if len(names) != count:
        raise ValueError(f"{len(names)} task names given for {count} tasks")
    for name in names:
        if not _TASK_NAME.fullmatch(name):
            raise ValueError(f"task name {name!r} cannot name a file: use letters, digits, '.', '_', '+', '-'")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"task name {repeated[0]!r} is given twice; name the tasks apart (--tasks)")
    return names


def task_path(directory: str | os.PathLike, name: str) -> Path:
    """Where task `name`'s file lives in a result directory."""
    return Path(directory) / "tasks" / f"{name}.safetensors"


def save_tensors(tensors: Mapping[str, Tensor], path: Path) -> Path:
    """Write tensors as one safetensors file (inside a temporary result folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, 0o644)  # safetensors writes 0600; results are ordinary files
    return path


def nbytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors' entries."""
    return sum(t.nbytes for t in tensors.values())


def result_manifest(*, method: str | None, kind: str, hyperparameters: Mapping | None, tasks: Sequence[str],
                    keys: Sequence[str], shared: Sequence[str], model_bytes: int, shared_bytes: int,
                    params: Sequence[int], task_bytes: Sequence[int], info: Mapping | None = None,
                    inputs: Mapping | None = None) -> dict:
    """The manifest of a result directory, without the file checksums (`write_manifest` adds them)."""
    return {"format": FORMAT, "version": VERSION, "method": method, "kind": kind,
            "hyperparameters": dict(hyperparameters or {}), "tasks": list(tasks), **dict(info or {}),
            "params_per_task": list(params), "bytes_per_task": list(task_bytes), "model_bytes": model_bytes,
            "shared_bytes": shared_bytes, "shared": list(shared), "keys": list(keys), "inputs": inputs}


def write_manifest(directory: Path, manifest: Mapping) -> Path:
    """Write manifest.json with the sha256 of every other file in `directory`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    checksums = {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}
    path = directory / MANIFEST
    path.write_text(json.dumps({**manifest, "files": checksums}, indent=1, default=str) + "\n")
    return path


def save_result(result, directory: str | os.PathLike, tasks: Sequence[str] | None = None, overwrite: bool = False,
                inputs: Mapping | None = None, method: str | None = None,
                hyperparameters: Mapping | None = None) -> Path:
    """Write a merging result (or a plain merger's state dict) as a BYOM directory.

    Args:
        result: a SparseTaskResult, LoraTaskResult or EMRResult, or a merged state dict.
        directory: the directory to create.
        tasks: task names in task order (default task0, task1, ...; for a state dict, none).
        overwrite: replace an existing result directory.
        inputs: what went in (formats, files with their sha256, settings), recorded as is.
        method, hyperparameters: what produced the result (default: what the result recorded).

    Returns:
        The directory as a Path.
    """
    plain = isinstance(result, Mapping)
    shared = {SHARED: result} if plain else result.stored_shared()
    count = 0 if plain else result.num_tasks
    names = task_names(tasks, len(tasks) if plain and tasks is not None else count)
    keys = list(next(iter(shared.values())))
    if hyperparameters is None:
        hyperparameters = getattr(result, "hyperparameters", None)
    with atomic_dir(directory, overwrite) as tmp:
        for stem, tensors in shared.items():
            save_tensors(tensors, tmp / f"{stem}.safetensors")
        for t, name in enumerate(names[:count]):
            save_tensors(result.stored_task(t), task_path(tmp, name))
        per_task = range(count)
        write_manifest(tmp, result_manifest(
            method=method or getattr(result, "method", None), kind=MERGED if plain else result.kind,
            hyperparameters=hyperparameters,
            tasks=names, keys=keys, shared=list(shared), model_bytes=nbytes(next(iter(shared.values()))),
            shared_bytes=sum(map(nbytes, shared.values())), params=[result.num_params(t) for t in per_task],
            task_bytes=[result.nbytes(t) for t in per_task], info=None if plain else result.stored_info(),
            inputs=inputs))
    return Path(directory)


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of a result directory; with `verify`, after checking the sha256 of every file it lists.

    Args:
        directory: a directory written by `save_result` or `byom-lab merge`.
        verify: recompute and compare every checksum (a mismatch raises ValueError naming the file).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: it is not a byom-lab result directory")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a byom-lab result manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has version {manifest.get('version')!r}; this byom-lab reads version {VERSION}")
    for name, expected in manifest["files"].items() if verify else ():
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in {path} but missing")
        found = sha256_file(file)
        if found != expected:
            raise ValueError(f"{file} does not match its sha256 in {path} (recorded {expected[:12]}..., "
                             f"found {found[:12]}...): the file changed after it was written")
    return manifest


def _load_ordered(path: Path, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Tensors of a safetensors file, in the order of `keys` when given."""
    tensors = load_file(str(path))
    return tensors if keys is None else {k: tensors[k] for k in keys}


def result_classes() -> dict[str, type]:
    """Every result class that can be stored, by its `kind`: the TaskExtras subclasses that name one."""
    found, todo = {}, list(TaskExtras.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if getattr(cls, "kind", None):
            found[cls.kind] = cls
    return found


def load_result(directory: str | os.PathLike):
    """Read back a BYOM directory written by `result.save(dir)` or `byom-lab merge`, checking every sha256.

    Args:
        directory: the result directory.

    Returns:
        The result object (SparseTaskResult, LoraTaskResult, EMRResult) with `method` and
        `hyperparameters` restored, or the merged state dict of a plain merger; equal to what was
        saved, bit for bit.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    shared = {stem: _load_ordered(directory / f"{stem}.safetensors", manifest["keys"]) for stem in manifest["shared"]}
    if manifest["kind"] == MERGED:
        return shared[SHARED]
    kinds = result_classes()
    if manifest["kind"] not in kinds:
        raise ValueError(f"{directory / MANIFEST} names an unknown result kind {manifest['kind']!r} "
                         f"(known: {', '.join(sorted(kinds))})")
    tasks = [_load_ordered(task_path(directory, name)) for name in manifest["tasks"]]
    result = kinds[manifest["kind"]].from_stored(shared, tasks, manifest)
    result.method, result.hyperparameters = manifest["method"], manifest["hyperparameters"]
    return result
