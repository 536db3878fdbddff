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


TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(final):
    """Yield a temp path beside `final`; on success it is renamed over `final`, on error removed.

    The temp file is named `.<final name>.<writer pid>.<random>.tmp`, so that a later run can tell
    the leftovers of a killed writer (`sweep_stale`) from a live writer's file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=final.parent)
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


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that created temp file `tmp` (pid in its name) still runs on this machine."""
    parts = tmp.name.rsplit(".", 3)  # [".<final name>", "<pid>", "<random>", "tmp"]
    try:
        pid = int(parts[1])
    except (IndexError, ValueError):
        return False  # not named by atomic_path (or an older byom-lab): nobody owns it
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(folder) -> list:
    """Remove temp files in `folder` left by writers that no longer run (a build killed with kill -9); returns them."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if not _writer_alive(tmp):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def cached(path, build, load):
    """Return load(path); build it first (atomically, under a lock) when absent or unreadable.

    Taking the lock also sweeps the folder's temp files of dead writers.
    """
    path = Path(path)
    with lock(path):
        sweep_stale(path.parent)
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
