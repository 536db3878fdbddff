"""One cache directory ($BYOM_LAB_HOME), config-hash keys, atomic writes under a file lock."""
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from filelock import FileLock


class CacheError(RuntimeError):
    """The cache directory cannot be used, or a cached file is unreadable."""


def home() -> Path:
    """The cache root, created if needed; a clear CacheError if it is not writable."""
    root = Path(os.environ.get("BYOM_LAB_HOME", Path.home() / ".cache" / "byom_lab")).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot create cache directory {root} (BYOM_LAB_HOME): {e.strerror}") from e
    if not os.access(root, os.W_OK | os.X_OK):
        raise CacheError(f"cache directory {root} (BYOM_LAB_HOME) is not writable")
    return root


def config_hash(config) -> str:
    """Short stable hash of a JSON-able config."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def entry(kind: str, config) -> Path:
    """Directory for one cached artifact keyed by kind and config hash."""
    path = home() / kind / config_hash(config)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(final):
    """Yield a temp path beside `final`; on success it is renamed over `final`, on error removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def lock(path) -> FileLock:
    """An inter-process lock guarding the artifact at `path`."""
    path = Path(path)
    return FileLock(str(path.parent / f".{path.name}.lock"))


def cached(path, build, load):
    """Return load(path); build it first (atomically, under a lock) when absent or unreadable."""
    path = Path(path)
    with lock(path):
        if path.exists():
            try:
                return load(path)
            except Exception as e:  # corrupted: rebuild, saying so
                import warnings

                warnings.warn(f"cached file {path} is unreadable ({type(e).__name__}: {e}); rebuilding it")
                path.unlink()
        with atomic_path(path) as tmp:
            build(tmp)
        return load(path)
