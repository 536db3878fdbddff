"""The one registry of merging methods: a decorator fills a dict, lookups fail loudly."""
from typing import Callable

_METHODS: dict[str, Callable] = {}
_INPUTS: dict[str, str] = {}
INPUTS = ("finetuned", "lora", "statistics", "test images")  # what a method takes besides θ0


def register(name: str, inputs: str = "finetuned") -> Callable[[Callable], Callable]:
    """Register a merging function under `name`; `inputs` is one of INPUTS.

    "statistics": (θ0, [θ_t], per-model statistics of training images), e.g. Fisher merging;
    "test images": (suite, ...) adapting on a suite's unlabeled test images, e.g. AdaMerging.
    """
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(map(repr, INPUTS))}, got {inputs!r}")

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"merging method {name!r} is registered twice")
        _METHODS[name] = fn
        _INPUTS[name] = inputs
        return fn

    return wrap


def list_methods(inputs: str | tuple | None = None) -> list[str]:
    """Names of every registered merging method, sorted; only those taking `inputs` (a kind or a tuple) if given."""
    kinds = (inputs,) if isinstance(inputs, str) else inputs
    return sorted(name for name in _METHODS if kinds is None or _INPUTS[name] in kinds)


def get_method(name: str) -> Callable:
    """The merging function registered as `name`; unknown names raise ValueError listing valid ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown merging method {name!r}; valid names: {', '.join(list_methods())}")
    return _METHODS[name]


def method_inputs(name: str) -> str:
    """What the method merges: "finetuned" state dicts, "lora" factors, "statistics" or "test images" (see INPUTS)."""
    get_method(name)
    return _INPUTS[name]


def method_name(fn: Callable) -> str | None:
    """The name `fn` is registered under, or None for an unregistered callable."""
    return next((name for name, registered in _METHODS.items() if registered is fn), None)
