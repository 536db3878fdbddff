"""The one registry of merging methods: a decorator fills a dict, lookups fail loudly."""
from typing import Callable

_METHODS: dict[str, Callable] = {}
_INPUTS: dict[str, str] = {}


def register(name: str, inputs: str = "finetuned") -> Callable[[Callable], Callable]:
    """Register a merging function under `name`; `inputs` is "finetuned" or "lora"."""

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"merging method {name!r} is registered twice")
        _METHODS[name] = fn
        _INPUTS[name] = inputs
        return fn

    return wrap


def list_methods() -> list[str]:
    """Names of every registered merging method, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> Callable:
    """The merging function registered as `name`; unknown names raise ValueError listing valid ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown merging method {name!r}; valid names: {', '.join(list_methods())}")
    return _METHODS[name]


def method_inputs(name: str) -> str:
    """What the method merges: "finetuned" state dicts or "lora" factors."""
    get_method(name)
    return _INPUTS[name]
