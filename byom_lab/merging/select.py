"""Exact top-magnitude selection over the float bit patterns, streamed over pieces.

The IEEE-754 bit pattern of |x|, read as an integer ("key"), orders like |x|. Nothing is sorted
whole, concatenated at full size, or passed to `torch.quantile`/`kthvalue` over every entry.

1. A strided sample guesses a narrow key window (low, high) around the k-th largest key.
2. When k is a small share of the entries (the usual top-m%), one pass keeps the keys >= low
   (and, when asked, their positions): about k entries. The k-th largest key is then read from
   the few candidates inside the window, and the kept positions are the candidates >= it.
3. Otherwise, or when the guess misses, a radix select finds the key digit by digit: one pass
   histograms a digit of every key (`bincount`), the bucket holding the k-th largest is kept, and
   the next pass refines inside that bucket only (two passes for float32, one inside a window).
"""
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from . import native
from .checks import check_choice, check_density, check_state_dict

CHUNK = 1 << 18  # elements per CPU piece: large enough to amortise dispatch, small enough for cache
GPU_CHUNK = 1 << 24  # on accelerators, fewer and larger pieces (kernel launches dominate)
SELECT_CHUNK = 1 << 20  # CPU pieces of a selection pass: nothing is reused from cache there
SAMPLE = 1 << 18  # about this many entries are sampled to guess the window
MAX_BINS = 1 << 18  # widest histogram of one pass (2 MiB of counts)
CANDIDATE_SHARE = 0.25  # the one-pass path is used for k up to this share of the entries (bounds its memory)
SCOPES = ("global", "tensor")
_BITS_AS_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

# source(stride) yields 1-D pieces covering x[::stride]; the same pieces in the same order each call
Source = Callable[[int], Iterable[Tensor]]


def chunk_size(tensor: Tensor) -> int:
    """Elements per piece when streaming over `tensor`: CHUNK on CPU, GPU_CHUNK elsewhere."""
    return CHUNK if tensor.device.type == "cpu" else GPU_CHUNK


def select_chunk_size(tensor: Tensor) -> int:
    """Elements per piece when a pass only selects (no running sums kept in cache)."""
    return max(chunk_size(tensor), SELECT_CHUNK)


def chunks(tensor: Tensor, size: int | None = None) -> Iterator[Tensor]:
    """Consecutive 1-D views of at most `size` (default `chunk_size`) elements covering `tensor`."""
    flat, size = tensor.reshape(-1), size or chunk_size(tensor)
    for start in range(0, flat.numel(), size):
        yield flat[start : start + size]


def num_kept(density: float, n: int) -> int:
    """How many of `n` entries a `density` fraction keeps: round(density·n), at least 1."""
    return min(n, max(1, round(density * n)))


def _magnitude_keys(piece: Tensor) -> Tensor:
    """|piece| reinterpreted as integers with the same order (16-bit keys widened to int32)."""
    keys = piece.abs().view(_BITS_AS_INT[piece.dtype])
    return keys.int() if keys.dtype == torch.int16 else keys


def _digit_histogram(source: Source, shift: int, base: int, nbins: int) -> Tensor:
    """Counts of (key >> shift) - base in bins 1..nbins; bin 0 gathers keys below, bin nbins+1 above."""
    hist, digits, filled = None, None, 0
    for piece in source(1):
        keys = _magnitude_keys(piece)
        keys = keys >> shift if shift else keys
        if digits is None:  # bincount costs O(nbins) per call: gather >= 8·nbins digits per call
            digits = torch.empty(max(8 * nbins, chunk_size(keys)), dtype=keys.dtype, device=keys.device)
        if filled + keys.numel() > digits.numel():
            hist, filled = _add_counts(hist, digits[:filled], nbins), 0
        if keys.numel() > digits.numel():
            hist = _add_counts(hist, keys.sub_(base - 1).clamp_(0, nbins + 1), nbins)
            continue
        batch = digits[filled : filled + keys.numel()]
        torch.sub(keys, base - 1, out=batch).clamp_(0, nbins + 1)  # in [0, nbins + 1]
        filled += keys.numel()
    return _add_counts(hist, digits[:filled], nbins)


def _add_counts(hist: Tensor | None, digits: Tensor, nbins: int) -> Tensor:
    """hist + the bincount of `digits`."""
    counts = torch.bincount(digits, minlength=nbins + 2)
    return counts if hist is None else hist.add_(counts)


def _radix(source: Source, k: int, shift: int, base: int, nbins: int) -> tuple[int, int] | None:
    """(key, count >= key) of the k-th largest key, starting inside a window; None if it lies outside."""
    while True:
        hist = _digit_histogram(source, shift, base, nbins)
        at_least = hist[1:].flip(0).cumsum(0).flip(0)  # (nbins + 1,): count with digit >= d
        if at_least[0] < k or hist[-1] >= k:
            return None
        digit = int((at_least[:nbins] >= k).nonzero().max())
        if shift == 0:
            key, kept = base + digit, int(at_least[digit])
            return key, kept - int(hist[1]) if key == 0 else kept  # a zero threshold keeps non-zeros
        step = min(16, shift)
        base, shift, nbins = (base + digit) << step, shift - step, 1 << step


def _guess_window(source: Source, k: int, total: int, dtype: torch.dtype) -> tuple[int, int] | None:
    """Keys (low, high) that bracket the k-th largest with high probability, from a strided sample."""
    stride = _sample_stride(total, dtype)
    if stride is None:
        return None
    sample = torch.cat([p.abs() for p in source(stride)])  # (about SAMPLE,)
    return _window(sample.view(_BITS_AS_INT[dtype]), k, total, dtype)


def _sample_stride(total: int, dtype: torch.dtype) -> int | None:
    """The stride of the window's sample; None for small inputs and 16-bit floats (a single pass)."""
    stride = total // SAMPLE
    return None if stride < 4 or torch.finfo(dtype).bits == 16 else stride


def _window(sample: Tensor, k: int, total: int, dtype: torch.dtype) -> tuple[int, int]:
    """(low, high) around the k-th largest of `total` keys, from the keys of a uniform sample of them."""
    n, q = sample.numel(), k / total
    slack = 5 * (n * q * (1 - q)) ** 0.5 + 5  # five standard deviations of the sampled rank
    high_rank, low_rank = round(q * n - slack), round(q * n + slack)  # ranks from the top
    keys = torch.topk(sample.long(), min(n, max(low_rank, 1))).values  # descending
    high = int(keys[high_rank - 1]) if high_rank >= 1 else torch.iinfo(torch.int64).max
    low = int(keys[low_rank - 1]) if low_rank <= n else 0
    return low, min(high, (1 << (torch.finfo(dtype).bits - 1)) - 1)


Array = Tensor | np.ndarray  # candidates stay numpy arrays on CPU (its compaction ops are faster there)
_SIGN_CLEARED = {torch.float32: 0x7FFFFFFF, torch.float64: 0x7FFFFFFFFFFFFFFF}


class _Keys:
    """Magnitude keys of pieces; on CPU computed by numpy into one reused buffer (valid until the next piece)."""

    def __init__(self):
        self.buffer = None

    def __call__(self, piece: Tensor) -> Array:
        if piece.device.type != "cpu":
            return _magnitude_keys(piece)
        if piece.dtype not in _SIGN_CLEARED:
            return _magnitude_keys(piece).numpy()
        bits = piece.detach().view(_BITS_AS_INT[piece.dtype]).numpy()
        if self.buffer is None or self.buffer.dtype != bits.dtype or self.buffer.size < bits.size:
            self.buffer = np.empty(bits.size, bits.dtype)
        return np.bitwise_and(bits, _SIGN_CLEARED[piece.dtype], out=self.buffer[: bits.size])


def _cat(parts: list[Array]) -> Tensor:
    """One tensor from 1-D numpy arrays or tensors."""
    if parts and isinstance(parts[0], np.ndarray):
        return torch.from_numpy(np.concatenate(parts))
    return torch.cat(parts)


def _count(mask: Array) -> int:
    """Number of true entries of a boolean array or tensor."""
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(mask.sum())


def _kth_smallest(keys: Tensor, rank: int) -> int:
    """The `rank`-th smallest (1-based) of a small 1-D integer tensor."""
    if keys.device.type == "cpu":
        return int(keys.kthvalue(rank).values)
    return int(keys.sort().values[rank - 1])  # on GPUs a sort of a small tensor beats kthvalue


def _at_least(keys: Array, low: int) -> tuple[Array, Array]:
    """(positions, keys) of the entries of 1-D `keys` that are >= low."""
    if isinstance(keys, np.ndarray):  # numpy's flatnonzero + take beats torch.nonzero and masking here
        where = np.flatnonzero(keys >= low)
    else:
        where = (keys >= low).nonzero().squeeze(1)
    return where, keys[where]


def _scan(source: Source, low: int) -> Iterator[tuple[Array, Array]]:
    """Per piece, the positions (in the concatenation of the pieces) and keys of the entries with key >= low."""
    offset, keys_of = 0, _Keys()
    for piece in source(1):
        where, keys = _at_least(keys_of(piece), low)
        where += offset
        offset += piece.numel()
        yield where, keys


def _from_candidates(source: Source, k: int, window: tuple[int, int],
                     positions: bool) -> tuple[int, int, Tensor | None] | None:
    """(key, kept, positions) from one pass keeping the keys >= low; None if fewer than k entries are."""
    low, high = window
    places, candidates = [], []
    for where, keys in _scan(source, low):
        if positions:
            places.append(where)
        candidates.append(keys)
    count = sum(len(keys) for keys in candidates)
    if count < k:
        return None  # the k-th largest lies below the window: the guess missed
    inside = _cat([keys[keys <= high] for keys in candidates])
    above = count - inside.numel()
    if above < k:
        key = _kth_smallest(inside, inside.numel() - (k - above) + 1)
    else:  # the k-th largest lies above the window; every entry above it is a candidate
        key = _kth_smallest(_cat(candidates), count - k + 1)
    masks = [keys >= max(key, 1) for keys in candidates]  # a zero threshold keeps the non-zero entries
    kept = sum(_count(mask) for mask in masks)
    return key, kept, _cat([w[m] for w, m in zip(places, masks, strict=True)]) if positions else None


def _radix_select(source: Source, k: int, window: tuple[int, int] | None, bits: int) -> tuple[int, int]:
    """(key, kept) by radix select: inside the window when one is given and holds, else over every key."""
    found = None
    if window is not None:
        low, high = window
        shift = 0
        while (high >> shift) - (low >> shift) + 1 > MAX_BINS:
            shift += 1
        found = _radix(source, k, shift, low >> shift, (high >> shift) - (low >> shift) + 1)
    return found or _radix(source, k, bits - 16, 0, 1 << 15)  # top digit: 15 bits (sign cleared)


def _select(source: Source, k: int, total: int | None, positions: bool) -> tuple[Tensor, int, Tensor | None]:
    """Threshold, kept count and (when asked) kept positions of the top-k magnitudes of `source`."""
    first = next(iter(source(1)))
    bits = torch.finfo(first.dtype).bits
    window = _guess_window(source, k, total, first.dtype) if total else None
    candidates = window is not None and k <= CANDIDATE_SHARE * total
    found = _from_candidates(source, k, window, positions) if candidates else None
    if found is None:  # a missed guess goes straight to the full radix select
        key, kept = _radix_select(source, k, None if candidates else window, bits)
        found = key, kept, _cat([where for where, _ in _scan(source, max(key, 1))]) if positions else None
    key, kept, where = found
    return key_threshold(key, first.dtype).to(first.device), kept, where


def key_threshold(key: int, dtype: torch.dtype) -> Tensor:
    """The float of `dtype` whose magnitude key is `key`, as a 0-dim tensor."""
    return torch.tensor(key, dtype=_BITS_AS_INT[dtype]).view(dtype)


def threshold_key(threshold: Tensor) -> int:
    """The magnitude key of a 0-dim float threshold (inverse of `key_threshold`)."""
    return int(threshold.reshape(1).view(_BITS_AS_INT[threshold.dtype])[0])


def fused_top(bases: list[Tensor], models: list[list[Tensor]], k: int, total: int,
              positions: bool) -> list[native.Selection | None] | None:
    """Per task t, the top-k magnitudes of the concatenated `models[t] − bases`, by the fused kernels.

    None when the kernels do not apply (see `native.applies`) or the input is too small for a
    sampled window; a task's entry is None when its window guess missed. The caller then takes the
    eager path (for that task).
    """
    if positions and k > CANDIDATE_SHARE * total:
        return None
    stride = _sample_stride(total, torch.float32)
    if stride is None or not native.applies(*bases, *(m for task in models for m in task)):
        return None
    windows = native.parallel(lambda task: _window(native.sample_keys(list(zip(bases, task)), stride), k, total,
                                                   torch.float32), models, [total] * len(models))
    return native.select(bases, models, [k] * len(models), windows, positions)


def kth_largest_magnitude(source: Source, k: int, total: int | None = None) -> tuple[Tensor, int]:
    """Exact k-th largest |x| over the pieces of `source`, and how many entries are >= it (ties).

    Args:
        source: source(stride) yields 1-D pieces of one floating dtype covering x[::stride].
        k: rank from the top, 1 <= k <= number of entries.
        total: number of entries (enables the sampled window when large).

    Returns:
        (threshold as a 0-dim tensor of the pieces' dtype, number of entries with |x| >= threshold;
        for a zero threshold, the number of non-zero entries).
    """
    threshold, kept, _ = _select(source, k, total, positions=False)
    return threshold, kept


def top_positions(source: Source, k: int, total: int | None = None) -> tuple[Tensor, int, Tensor]:
    """`kth_largest_magnitude` plus the kept positions: ascending int64 indices into the pieces' concatenation."""
    return _select(source, k, total, positions=True)


def shrink_level(threshold: Tensor) -> float:
    """The largest float below `threshold` (0 for a zero threshold): hardshrink at it keeps |x| >= threshold."""
    bits = threshold.view(_BITS_AS_INT[threshold.dtype])
    return float((bits - 1).clamp_(min=0).view(threshold.dtype))


def keep_at_least(x: Tensor, threshold: Tensor) -> Tensor:
    """Entries of `x` with |x| >= threshold (non-zero ones when threshold is 0), the rest zeroed."""
    return torch.nn.functional.hardshrink(x, shrink_level(threshold.to(x.dtype)))


def _common_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """The promoted floating dtype of `tensors`."""
    dtype = None
    for t in tensors:
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def top(x: Mapping[str, Tensor], density: float, scope: str = "global") -> tuple[dict[str, Tensor], float]:
    """Keep the largest-magnitude `density` fraction of the entries of `x`, zero the rest.

    Args:
        x: state-dict-like mapping of floating-point tensors (not modified).
        density: fraction of entries to keep, in (0, 1].
        scope: "global" ranks all entries of `x` together (original TIES code); "tensor" ranks
            within each tensor (mergekit, peft).

    Returns:
        (kept, realised_density): the sparsified copy and the fraction of entries actually kept.
        Entries tied with the threshold are all kept, so the count exceeds round(density·n) by at
        most the number of ties; a zero threshold keeps only non-zero entries.
    """
    check_state_dict(x, "x")
    density = check_density(density)
    check_choice(scope, "scope", SCOPES)
    total = sum(t.numel() for t in x.values())
    if scope == "global":
        dtype = _common_dtype(x.values())
        threshold, kept = kth_largest_magnitude(
            lambda stride: (c.to(dtype) for t in x.values() for c in chunks(t.reshape(-1)[::stride])),
            num_kept(density, total), total,
        )
        return {name: keep_at_least(t, threshold) for name, t in x.items()}, kept / total
    out, kept = {}, 0
    for name, t in x.items():
        if t.numel() == 0:
            out[name] = t.clone()
            continue
        source = lambda stride, t=t: chunks(t.reshape(-1)[::stride])  # noqa: E731
        threshold, kept_here = kth_largest_magnitude(source, num_kept(density, t.numel()), t.numel())
        out[name], kept = keep_at_least(t, threshold), kept + kept_here
    return out, kept / total
