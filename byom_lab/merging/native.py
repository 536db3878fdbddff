"""Fused CPU kernels (native.c), compiled on first use with the system C compiler, called via ctypes.

The eager torch/numpy path makes several passes over every task vector (subtract, key, compare,
compact; or subtract, trim, five running sums, combine). On a CPU those passes, not the reads of
the checkpoints, are most of the time. The kernels do each step in one pass with the same float32
arithmetic in the same order, so results are identical to the eager path's, bit for bit.

They apply to contiguous float32 CPU tensors (anything else, DARE's random drop, or a machine
without a C compiler takes the eager path). ctypes releases the GIL during a call, so pieces run
on `torch.get_num_threads()` Python threads. Set BYOM_LAB_NATIVE=0 to turn the kernels off.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from .checks import prove_finite

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
BLOCK = 1024  # must match BLOCK in native.c
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]
_I64, _I32, _F32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_PTR = ctypes.c_void_p


def _cpu_tag() -> str:
    """What the compiled code depends on besides its source: machine, CPU model and flags."""
    tag = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        tag += "".join(line for line in lines if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return tag


def _build_dir() -> Path:
    """Where compiled kernels live: $BYOM_LAB_NATIVE_DIR, else `native/` in $BYOM_LAB_HOME (default ~/.cache/byom_lab).

    Read from the environment here, so that the merging package needs nothing from the suite machinery.
    """
    explicit = os.environ.get("BYOM_LAB_NATIVE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("BYOM_LAB_HOME", Path.home() / ".cache" / "byom_lab")).expanduser() / "native"


def compile_library(target: Path, arch: Sequence[str] = ("-march=native",)) -> None:
    """Compile native.c into the shared library `target` (atomically), with `arch` flags when accepted."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for flags in ([*arch], []) if arch else ([],):  # some compilers reject -march=native
            try:
                done = subprocess.run([compiler, *_FLAGS, *flags, str(SOURCE), "-o", tmp],
                                      capture_output=True, text=True, check=False)
            except OSError as e:
                raise OSError(f"cannot run the C compiler {compiler!r}: {e}") from e
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders each install a whole file
                return
        raise OSError(f"{compiler} failed: {done.stderr.strip()[:500]}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled native.c and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    lib.bl_select.restype = _I64
    lib.bl_select.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _PTR]
    lib.bl_compact.restype = _I64
    lib.bl_compact.argtypes = [_PTR, _PTR, _I64, _PTR, _I32]
    lib.bl_sample.restype = _I64
    lib.bl_sample.argtypes = [_PTR, _PTR, _I64, _I64, _PTR]
    lib.bl_merge.restype = ctypes.c_int
    lib.bl_merge.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _PTR, ctypes.c_int, ctypes.c_int, _F32, _PTR]
    return lib


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("BYOM_LAB_NATIVE", "1") == "0":
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode() + _cpu_tag().encode()).hexdigest()
    target = _build_dir() / f"kernels-{digest[:16]}.so"
    try:
        if not target.exists():
            compile_library(target)
        return load_library(target)
    except OSError as e:
        log.info("fused kernels unavailable, using the eager path: %s", e)
        return None


def available() -> bool:
    """Whether the fused kernels are compiled and loaded (False with BYOM_LAB_NATIVE=0)."""
    return _library() is not None


def applies(*tensors: Tensor) -> bool:
    """Whether the kernels can run on these tensors: contiguous float32 on the CPU, < 2^31 entries."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               and t.numel() < 2**31 for t in tensors) and available()


_POOL: list = [None, 0]  # the worker threads and their number
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads
    os.register_at_fork(after_in_child=lambda: _POOL.__setitem__(slice(None), [None, 0]))
CANDIDATE_SLACK = 1.25  # candidate buffers hold this times the expected share of a piece
WINDOW_SHARE = 64  # window buffers hold 1/WINDOW_SHARE of a piece (about twice the expected share)
PIECE = 1 << 24  # entries: larger tensors are cut into pieces of this size
SERIAL = 1 << 16  # entries: less work than this runs on the calling thread


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _runs(sizes: Sequence[int], workers: int) -> list[range]:
    """Split item indices 0..len(sizes)-1 into at most `workers` contiguous runs of similar total size."""
    total, runs, begin, acc = sum(sizes), [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc * workers >= total * (len(runs) + 1) and len(runs) < workers - 1:
            runs.append(range(begin, i + 1))
            begin = i + 1
    runs.append(range(begin, len(sizes)))
    return [run for run in runs if len(run)]


def parallel(fn, items: Sequence, sizes: Sequence[int]) -> list:
    """[fn(item) for item in items] on torch.get_num_threads() threads, each taking a contiguous run of
    items of similar total size (`sizes`); ctypes releases the GIL while a kernel runs."""
    workers = _threads() if sum(sizes) >= SERIAL else 1
    runs = _runs(sizes, workers)
    if len(runs) <= 1:
        return [fn(item) for item in items]
    if _POOL[1] != len(runs):
        if _POOL[0] is not None:
            _POOL[0].shutdown()
        _POOL[:] = [ThreadPoolExecutor(len(runs), thread_name_prefix="byom-native"), len(runs)]
    done = _POOL[0].map(lambda run: [fn(items[i]) for i in run], runs)
    return [result for run in done for result in run]


def _pieces(sizes: Sequence[int], size: int = PIECE) -> list[tuple[int, int, int]]:
    """(tensor index, start, length) pieces of at most `size` entries covering every tensor."""
    return [(i, s, min(size, n - s)) for i, n in enumerate(sizes) for s in range(0, n, size)]


def _ptr(array: np.ndarray, offset: int = 0) -> int:
    return array.ctypes.data + offset * array.itemsize


def merge(base: Tensor, models: Sequence[Tensor], keep: Sequence[int] | None, consensus: bool, mean: bool,
          lam: float) -> Tensor:
    """base + lam·τ over one tensor; keep[t] is task t's smallest kept magnitude key (None: no trimming)."""
    lib = _library()
    out = torch.empty_like(base)
    pointers = (ctypes.c_void_p * len(models))(*[m.data_ptr() for m in models])
    least = (ctypes.c_int32 * len(models))(*keep) if keep is not None else None

    def run(piece) -> int:
        _, start, n = piece
        return lib.bl_merge(base.data_ptr(), pointers, len(models), start, n, least, int(consensus), int(mean),
                            lam, out.data_ptr())

    per_thread = -(-base.numel() // _threads())
    pieces = _pieces([base.numel()], max(8, -(-per_thread // 8) * 8))  # one piece per thread, whole vectors
    if not any(parallel(run, pieces, [p[2] for p in pieces])):
        prove_finite([base, *models])
    return out


def sample_keys(pairs: Sequence[tuple[Tensor, Tensor]], stride: int) -> Tensor:
    """Magnitude keys of (model − base)[::stride] of every pair, concatenated (int32)."""
    lib = _library()
    sizes = [-(-base.numel() // stride) for base, _ in pairs]
    out, offset = np.empty(sum(sizes), np.int32), 0
    for (base, model), size in zip(pairs, sizes, strict=True):
        offset += lib.bl_sample(model.data_ptr(), base.data_ptr(), base.numel(), stride, _ptr(out, offset))
    return torch.from_numpy(out)


class Selection(NamedTuple):
    """The k-th largest magnitude key, how many entries are >= it, and (when asked) the kept entries."""

    key: int
    kept: int
    entries: list[tuple[Tensor, Tensor]] | None  # per tensor: (int32 flat indices, the model's values)


class TaskScan(ctypes.Structure):
    """struct task_scan of native.c: one task's window, counts and buffers in a selection pass."""

    _fields_ = [("low", _I32), ("high", _I32), ("above", _I64), ("window", _PTR), ("window_cap", _I64),
                ("window_len", _I64), ("pos", _PTR), ("values", _PTR), ("cap", _I64),
                ("len", _I64), ("nonfinite", _I32)]


class _Found:
    """What one piece's pass found for one task: count above the window, window keys, candidates."""

    def __init__(self):
        self.above, self.window, self.candidates, self.nonfinite = 0, [], [], False
        self.buffers = None  # the arrays the kernel is filling now


def _refill(state: TaskScan, found: _Found, left: int, share: float, positions: bool) -> None:
    """Keep what the task's buffers hold and hand it fresh ones for (at most) `left` more entries."""
    _flush(state, found)
    window = np.empty(left // WINDOW_SHARE + BLOCK, np.int32)  # the kernel needs room for a block, then stops
    cap = min(left, int(share * left * CANDIDATE_SLACK)) + BLOCK + 8 if positions else 0
    pos, values = np.empty(cap, np.int32), np.empty(cap, np.float32)
    found.buffers = window, pos, values
    state.window, state.window_cap, state.window_len = _ptr(window), window.size, 0
    state.pos, state.values, state.cap, state.len = _ptr(pos) if positions else None, _ptr(values), cap, 0


def _flush(state: TaskScan, found: _Found) -> None:
    if found.buffers is not None:
        window, pos, values = found.buffers
        found.window.append(window[: state.window_len])
        if state.pos:  # candidates[j] goes with window[j]: their in-window entries take its keys in order
            found.candidates.append((pos, values, state.len))
        found.buffers = None


class _Piece:
    """Entries [start, start + n) of one tensor for every task: kernel states, buffers, findings.

    Made on the calling thread, so that its (large) first buffers come from the main heap, which
    keeps freed memory for the next call; the worker threads' own heaps hand it back to the system.
    """

    def __init__(self, base: Tensor, models: Sequence[Tensor], start: int, n: int,
                 windows: Sequence[tuple[int, int]], shares: Sequence[float], positions: bool):
        self.base, self.start, self.n, self.shares, self.positions = base, start, n, shares, positions
        self.pointers = (ctypes.c_void_p * len(models))(*[m.data_ptr() for m in models])
        self.states, self.found = (TaskScan * len(models))(), [_Found() for _ in models]
        for state, found, share, (low, high) in zip(self.states, self.found, shares, windows, strict=True):
            state.low, state.high = low, high
            _refill(state, found, n, share, positions)

    def run(self, lib) -> list[_Found]:
        """bl_select over the piece, handing tasks fresh buffers when theirs are full; the findings per task."""
        done = 0
        while done < self.n:
            left = self.n - done
            for state, found, share in zip(self.states, self.found, self.shares, strict=True):
                if state.window_len + BLOCK > state.window_cap or (
                        self.positions and state.len + BLOCK + 8 > state.cap):
                    _refill(state, found, left, share, self.positions)
            step = lib.bl_select(self.base.data_ptr(), self.pointers, len(self.found), self.start + done, left,
                                 self.states)
            if step == 0:
                raise RuntimeError("bl_select made no progress (buffers smaller than one block)")
            done += step
        for state, found in zip(self.states, self.found, strict=True):
            _flush(state, found)
            found.above, found.nonfinite = state.above, bool(state.nonfinite)
        return self.found


def select(bases: Sequence[Tensor], models: Sequence[Sequence[Tensor]], ks: Sequence[int],
           windows: Sequence[tuple[int, int]], positions: bool) -> list[Selection | None]:
    """Per task t, the exact top-ks[t] magnitudes of the concatenated models[t] − bases, in one pass.

    Args:
        bases: the tensors subtracted, in order (θ0 or a merged model), read once for all tasks.
        models: models[t][i] is task t's tensor matching bases[i].
        ks: entries kept per task.
        windows: per task, a guessed (low, high) window of keys around the k-th largest.
        positions: also return the kept entries (indices into each tensor and the models' values).

    Returns:
        Per task a Selection, or None when its k-th largest key lies outside its window (the caller
        falls back for that task).
    """
    lib = _library()
    total = sum(b.numel() for b in bases)
    shares = [min(1.0, k / total * 1.05 + 1e-3) for k in ks]  # expected share of entries with key >= low
    pieces = _pieces([b.numel() for b in bases])
    sizes = [p[2] for p in pieces]
    work = [_Piece(bases[i], [m[i] for m in models], start, n, windows, shares, positions) for i, start, n in pieces]
    found = parallel(lambda piece: piece.run(lib), work, sizes)  # found[piece][task]
    out = [None] * len(models)
    least = []
    for t, (task_models, k) in enumerate(zip(models, ks, strict=True)):
        if not any(f[t].nonfinite for f in found):
            prove_finite([*bases, *task_models])
        above = sum(f[t].above for f in found)
        inside = np.concatenate([w for f in found for w in f[t].window])
        need = k - above  # rank of the threshold among the window's keys, from the top
        if need < 1 or need > inside.size:
            least.append(None)
            continue
        key = int(np.partition(inside, inside.size - need)[inside.size - need])
        least.append(max(key, 1))  # a zero threshold keeps the non-zero entries
        out[t] = Selection(key, above + int(np.count_nonzero(inside >= least[t])), None)
    if not positions:
        return out

    def compact(piece: list[_Found]) -> list[list[tuple[np.ndarray, np.ndarray]] | None]:
        kept = []
        for f, threshold in zip(piece, least, strict=True):
            if threshold is None:
                kept.append(None)
                continue
            kept.append([])
            for (pos, values, n), window in zip(f.candidates, f.window, strict=True):
                n = lib.bl_compact(_ptr(pos), _ptr(values), n, _ptr(window), threshold)
                kept[-1].append((pos[:n], values[:n]))
        return kept

    parts = parallel(compact, found, sizes)  # parts[piece][task]
    for t, selection in enumerate(out):
        if selection is not None:
            entries: list[list] = [[] for _ in bases]
            for (i, _, _), piece in zip(pieces, parts, strict=True):
                entries[i].extend(piece[t])
            out[t] = selection._replace(entries=[_join(e) for e in entries])
    return out


def _join(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor]:
    """One (indices, values) pair of tensors from parts; copies only what would waste memory."""
    if len(parts) == 1 and parts[0][0].base is not None and parts[0][0].size * 4 >= parts[0][0].base.size * 3:
        pos, values = parts[0]
    else:
        pos = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int32)
        values = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, np.float32)
    return torch.from_numpy(pos), torch.from_numpy(values)
