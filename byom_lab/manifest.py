"""Reads data_manifest.yaml: tiny-suite tasks, suites and asset checksums."""
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


class ChecksumError(ValueError):
    """A file or array does not match the sha256 recorded in the manifest."""


@dataclass(frozen=True)
class TaskSpec:
    """One tiny-suite task as described by the manifest."""

    name: str
    mirrors: str
    family: str
    generator: str
    seed: int
    sizes: dict
    classes: tuple
    captioned: tuple
    class_subset: tuple = ()  # for split tasks: indices into the parent's classes
    parent: str = ""


def manifest_path() -> Path:
    return Path(os.environ.get("BYOM_LAB_MANIFEST", ROOT / "data_manifest.yaml"))


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"data manifest not found at {path} (set BYOM_LAB_MANIFEST)")
    with open(path) as f:
        return yaml.safe_load(f)


def manifest() -> dict:
    return _load(str(manifest_path()))


def tiny_tasks() -> dict:
    """All tiny task specs by name, split tasks (similar pair) included."""
    tiny = manifest()["tiny"]
    out = {}
    for name, t in tiny["tasks"].items():
        out[name] = TaskSpec(name=name, mirrors=t["mirrors"], family=t["family"], generator=t["generator"],
                             seed=int(t["seed"]), sizes=dict(t["sizes"]), classes=tuple(t["classes"]),
                             captioned=tuple(t.get("captioned", ())))
    for name, s in tiny.get("splits", {}).items():
        parent = out[s["of"]]
        idx = tuple(s["classes"])
        out[name] = TaskSpec(name=name, mirrors=parent.mirrors + " (split)", family=parent.family,
                             generator=parent.generator, seed=parent.seed, sizes=parent.sizes,
                             classes=tuple(parent.classes[i] for i in idx), captioned=(),
                             class_subset=idx, parent=parent.name)
    return out


def suites() -> dict:
    """Suite name -> list of task names (the tiny family; 'paper' is handled separately)."""
    return {k: list(v) for k, v in manifest()["tiny"]["suites"].items()}


def templates() -> list:
    return list(manifest()["tiny"]["templates"])


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(what: str, actual: str, expected) -> None:
    """Raise ChecksumError naming `what` when a recorded checksum differs (None: nothing recorded)."""
    if expected is None:
        return
    if not isinstance(expected, str):
        raise ChecksumError(f"manifest sha256 for {what} must be a quoted hex string, got {expected!r}")
    if actual != expected:
        raise ChecksumError(f"checksum mismatch for {what}: manifest says sha256 {expected}, got {actual}")


def asset_path(name: str) -> Path:
    assets = manifest()["assets"]
    if name not in assets:
        raise KeyError(f"unknown asset {name!r}; manifest lists {sorted(assets)}")
    return ROOT / assets[name]["file"]


def verified_asset(name: str) -> Path:
    """Path of an asset after checking it exists and matches its manifest sha256."""
    path = asset_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"asset {name!r} missing at {path}; rebuild it with `byom-lab pretrain`")
    check_sha256(f"asset {name!r} ({path})", sha256_file(path), manifest()["assets"][name].get("sha256"))
    return path


def record_asset_sha256(name: str, sha: str) -> None:
    """Write an asset's sha256 into the manifest file in place (atomically, comments kept)."""
    import re

    from .cache import atomic_path

    path = manifest_path()
    text = path.read_text()
    block = re.search(rf"^  {re.escape(name)}:\n(?:    .*\n)+", text, flags=re.M)
    if not block:
        raise KeyError(f"asset {name!r} not found in {path}")
    new_block = re.sub(r"^    sha256: .*$", f'    sha256: "{sha}"', block.group(0), count=1, flags=re.M)
    with atomic_path(path) as tmp:
        tmp.write_text(text[: block.start()] + new_block + text[block.end():])
    _load.cache_clear()
