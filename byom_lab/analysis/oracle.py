"""Textbook next to fast: do two implementations of a method agree, and how much faster is the fast one?"""
import inspect
import time

import pandas as pd


def _state_dicts(result) -> list:
    """The state dicts a method returned: a dict, a list of dicts, a (θ*, [θ_t]) pair, or a result object."""
    if isinstance(result, dict):
        return [result]
    if hasattr(result, "task_state_dict"):
        return [result.task_state_dict(t) for t in range(result.num_tasks)]
    if isinstance(result, tuple):  # textbook BYOM-FFT: (θ*, [θ* + top(u_t)])
        return _state_dicts(result[1])
    return [sd for item in result for sd in _state_dicts(item)]


def _seconds(fn, repeats: int) -> tuple:
    """(best wall time over `repeats` calls, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def compare(textbook, fast, repeats: int = 3) -> pd.Series:
    """Run two zero-argument callables that build the same models; their agreement and timings.

    Returns a Series: max_abs_difference (over every tensor of every model), textbook_seconds,
    fast_seconds (best of `repeats`) and speedup (textbook / fast).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    slow_s, a = _seconds(textbook, repeats)
    fast_s, b = _seconds(fast, repeats)
    a, b = _state_dicts(a), _state_dicts(b)
    if len(a) != len(b):
        raise ValueError(f"the textbook built {len(a)} models, the fast one {len(b)}")
    diff = max(float((x[k].float() - y[k].float()).abs().max()) if x[k].numel() else 0.0
               for x, y in zip(a, b) for k in x)
    return pd.Series({"max_abs_difference": diff, "textbook_seconds": slow_s, "fast_seconds": fast_s,
                      "speedup": slow_s / fast_s if fast_s > 0 else float("inf")})


def show_source(fn):
    """A function's source as a Markdown code block (renders highlighted in a notebook)."""
    from IPython.display import Markdown

    return Markdown(f"```python\n{inspect.getsource(fn).rstrip()}\n```")



