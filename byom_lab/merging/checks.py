"""Input validation: every bad input becomes a ValueError that names the key, shapes or range."""
import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


def check_finite(tensor: Tensor, where: str) -> None:
    """Raise unless every entry is finite (a finite sum proves it; only a non-finite sum is rechecked)."""
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise ValueError(f"{where} contains NaN or Inf values")


def check_tensor(tensor: Tensor, where: str, finite: bool = True) -> None:
    """Raise unless `tensor` is a floating-point tensor (and, when `finite`, has no NaN or Inf)."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{where} is a {type(tensor).__name__}, not a torch.Tensor")
    if not tensor.is_floating_point():
        raise ValueError(f"{where} has dtype {tensor.dtype}; merging needs floating-point tensors")
    if finite:
        check_finite(tensor, where)


def check_state_dict(state: StateDict, name: str = "state dict", finite: bool = True) -> None:
    """Raise unless `state` is a non-empty mapping of (finite) floating-point tensors."""
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{name} must be a non-empty dict of tensors, got {type(state).__name__}")
    for key, tensor in state.items():
        check_tensor(tensor, f"{name} key {key!r}", finite)
    if sum(tensor.numel() for tensor in state.values()) == 0:
        raise ValueError(f"{name} has no entries (every tensor is empty)")


def check_models(pretrained: StateDict, finetuned: Sequence[StateDict], finite: bool = True) -> None:
    """Raise unless every fine-tuned model has the pretrained keys, shapes and dtypes (and all are finite)."""
    check_state_dict(pretrained, "pretrained", finite)
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence) or len(finetuned) == 0:
        raise ValueError("finetuned must be a non-empty list of state dicts (one per task)")
    for t, model in enumerate(finetuned):
        if not isinstance(model, Mapping):
            raise ValueError(f"finetuned[{t}] is a {type(model).__name__}, not a dict of tensors")
        check_same_layout(pretrained, model, f"finetuned[{t}]")
        for key, tensor in model.items():
            check_tensor(tensor, f"finetuned[{t}] key {key!r}", finite)


# Tensors that a fused kernel read whole and found finite, while a `models_checked` block runs.
_PROVEN: ContextVar[set | None] = ContextVar("byom_lab_proven_finite", default=None)


def _identity(tensor: Tensor) -> tuple:
    """Which entries a tensor is: the same memory, count, layout and dtype hold the same values."""
    return tensor.data_ptr(), tensor.numel(), tuple(tensor.stride()), tensor.dtype, tensor.device


def prove_finite(tensors: Sequence[Tensor]) -> None:
    """Record that every entry of `tensors` was read and is finite (inside a `models_checked` block)."""
    proven = _PROVEN.get()
    if proven is not None:
        proven.update(map(_identity, tensors))


def _check_models_finite(pretrained: StateDict, finetuned: Sequence[StateDict], proven: set) -> None:
    for name, state in [("pretrained", pretrained), *((f"finetuned[{t}]", m) for t, m in enumerate(finetuned))]:
        for key, tensor in state.items():
            if _identity(tensor) not in proven:
                check_finite(tensor, f"{name} key {key!r}")


@contextmanager
def models_checked(pretrained: StateDict, finetuned: Sequence[StateDict]) -> Iterator[None]:
    """`check_models`, with the NaN/Inf scan folded into the work: layouts are checked now; after the
    block, every tensor that no fused kernel proved finite (`prove_finite`) is scanned. The same
    errors are raised, in the same order; only work on the (unmodified) inputs has happened first.
    """
    check_models(pretrained, finetuned, finite=False)
    token = _PROVEN.set(set())
    try:
        yield
    except Exception:
        _check_models_finite(pretrained, finetuned, set())  # a NaN or Inf explains a failure best
        raise
    else:
        _check_models_finite(pretrained, finetuned, _PROVEN.get())
    finally:
        _PROVEN.reset(token)


def check_same_layout(reference: StateDict, other: StateDict, name: str) -> None:
    """Raise naming the first key that is missing, extra, or differs in shape or dtype."""
    for key, ref in reference.items():
        if key not in other:
            raise ValueError(f"{name} is missing key {key!r} (present in pretrained)")
        if not isinstance(other[key], Tensor):
            raise ValueError(f"{name} key {key!r} is a {type(other[key]).__name__}, not a torch.Tensor")
        if other[key].shape != ref.shape:
            raise ValueError(
                f"{name} key {key!r} has shape {tuple(other[key].shape)} "
                f"but pretrained has shape {tuple(ref.shape)}"
            )
        if other[key].dtype != ref.dtype:
            raise ValueError(f"{name} key {key!r} has dtype {other[key].dtype} but pretrained has {ref.dtype}")
    for key in other:
        if key not in reference:
            raise ValueError(f"{name} has key {key!r} that pretrained lacks")


def check_fraction(value: float, name: str, *, low_open: bool = True, high_open: bool = False) -> float:
    """Raise unless `value` lies in (0, 1] (or the interval the flags describe); return it as float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        low = value > 0 if low_open else value >= 0
        high = value < 1 if high_open else value <= 1
        ok = low and high
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def check_density(density: float, name: str = "density") -> float:
    """Raise unless density lies in (0, 1]; a value in (1, 100] is explained as a percent given for a fraction."""
    try:
        return check_fraction(density, name)
    except ValueError as e:
        if isinstance(density, (int, float)) and 1 < density <= 100:
            raise ValueError(f"{e}: {name} is m as a fraction, not a percent (m = {density:g}% is "
                             f"{name} {density / 100:g})") from None
        raise


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    """Raise unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_lora(pretrained: StateDict, lora: Sequence[Mapping[str, tuple]], rank: int) -> None:
    """Raise unless every LoRA update matches its pretrained matrix and 1 <= rank <= its LoRA rank."""
    check_state_dict(pretrained, "pretrained")
    if isinstance(lora, Mapping) or not isinstance(lora, Sequence) or len(lora) == 0:
        raise ValueError("lora must be a non-empty list of {name: (B, A)} dicts (one per task)")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    names = list(lora[0]) if isinstance(lora[0], Mapping) else []
    for t, factors in enumerate(lora):
        if not isinstance(factors, Mapping) or not factors:
            raise ValueError(f"lora[{t}] must be a non-empty dict of (B, A) pairs")
        if list(factors) != names and set(factors) != set(names):
            extra = sorted(set(factors) ^ set(names))[0]
            raise ValueError(f"lora[{t}] and lora[0] differ in matrix names, first: {extra!r}")
        for name, pair in factors.items():
            _check_lora_pair(pretrained, name, pair, rank, f"lora[{t}][{name!r}]")


def _check_lora_pair(pretrained: StateDict, name: str, pair: tuple, rank: int, where: str) -> None:
    """Raise unless (B, A) are finite float factors of pretrained[name] with rank <= r."""
    if name not in pretrained:
        raise ValueError(f"{where}: {name!r} is not a key of pretrained")
    weight = pretrained[name]
    if weight.ndim != 2:
        raise ValueError(f"{where}: pretrained {name!r} has shape {tuple(weight.shape)}, not a matrix")
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{where} must be a (B, A) pair")
    B, A = pair
    check_tensor(B, f"{where} B")
    check_tensor(A, f"{where} A")
    d_out, d_in = weight.shape
    if B.ndim != 2 or A.ndim != 2 or B.shape[0] != d_out or A.shape[1] != d_in or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"{where}: B {tuple(B.shape)} @ A {tuple(A.shape)} does not give the pretrained shape "
            f"{tuple(weight.shape)} (need B: d_out x r, A: r x d_in)"
        )
    if rank > B.shape[1]:
        raise ValueError(f"rank must lie in [1, r] = [1, {B.shape[1]}] for {where}, got {rank}")
