"""The task-arithmetic family, each member one `Recipe` of the general mechanism (general.py)."""
import inspect
from dataclasses import replace
from typing import Callable, Mapping, Sequence

from torch import Tensor

from .checks import models_checked
from .general import Recipe, merge_validated
from .registry import get_method, register

StateDict = Mapping[str, Tensor]

RECIPES: dict[str, Callable[..., Recipe]] = {
    "simple_average": lambda num_tasks: Recipe(lam=1 / num_tasks),
    "task_arithmetic": lambda num_tasks, lam=0.3: Recipe(lam=lam),
    "ties": lambda num_tasks, density=0.2, lam=1.0, scope="global", merge="mean": Recipe(
        lam=lam, density=density, scope=scope, consensus=True, merge=merge
    ),
}


def _member_recipe(name: str, num_tasks: int, drop: float = 0.0, seed: int = 0, **options) -> Recipe:
    """The recipe of family member `name` with its options, plus DARE's drop."""
    try:
        return replace(RECIPES[name](num_tasks, **options), drop=drop, seed=seed)
    except TypeError:
        valid = [p for p in inspect.signature(RECIPES[name]).parameters if p != "num_tasks"]
        unknown = sorted(set(options) - set(valid))
        raise ValueError(f"{name} has no option {unknown[0]!r}; its options: {', '.join(valid) or 'none'}") from None


def _merge_family(name: str, pretrained: StateDict, finetuned: Sequence[StateDict], drop: float = 0.0,
                  seed: int = 0, **options) -> dict[str, Tensor]:
    """Validate, build the recipe of family member `name` (plus DARE's drop), merge."""
    with models_checked(pretrained, finetuned):
        recipe = _member_recipe(name, len(finetuned), drop, seed, **options)
        return merge_validated(pretrained, finetuned, recipe).merged


def _check_dare_base(base: str) -> None:
    """Raise unless `base` is a family member DARE can drop before."""
    get_method(base)
    if base not in RECIPES:
        raise ValueError(f"dare base must be one of {', '.join(sorted(RECIPES))}, got {base!r}")


def family_recipe(method: str, num_tasks: int, **options) -> Recipe:
    """The recipe the registered family method `method` (DARE included) merges with, given its options.

    Args:
        method: "simple_average", "task_arithmetic", "ties" or "dare".
        num_tasks: T.
        **options: the method's keyword options (e.g. lam=0.3; for DARE drop, seed, base and its options).
    """
    if method == "dare":
        try:
            bound = inspect.signature(dare).bind(None, None, **options)
        except TypeError as e:
            raise ValueError(f"dare: {e}") from None
        bound.apply_defaults()
        a = bound.arguments
        _check_dare_base(a["base"])
        return _member_recipe(a["base"], num_tasks, a["drop"], a["seed"], **a["base_kwargs"])
    if method not in RECIPES:
        raise ValueError(f"{method!r} is not in the task-arithmetic family ({', '.join([*sorted(RECIPES), 'dare'])})")
    return _member_recipe(method, num_tasks, **options)


@register("simple_average")
def simple_average(pretrained: StateDict, finetuned: Sequence[StateDict]) -> dict[str, Tensor]:
    """Uniform weight averaging θ0 + (1/T) Σ v_t (model soups, arXiv 2203.05482).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
    """
    return _merge_family("simple_average", pretrained, finetuned)


@register("task_arithmetic")
def task_arithmetic(pretrained: StateDict, finetuned: Sequence[StateDict], lam: float = 0.3) -> dict[str, Tensor]:
    """Task arithmetic θ0 + λ Σ v_t (arXiv 2212.04089).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        lam: scaling coefficient λ (choose it on validation data).
    """
    return _merge_family("task_arithmetic", pretrained, finetuned, lam=lam)


@register("ties")
def ties(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.2, lam: float = 1.0,
         scope: str = "global", merge: str = "mean") -> dict[str, Tensor]:
    """TIES-Merging: trim, elect sign, disjoint merge (arXiv 2306.01708).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        density: fraction of each task vector kept by magnitude, in (0, 1].
        lam: scale λ of the merged vector.
        scope: "global" (rank over the whole task vector, as the TIES code) or "tensor".
        merge: "mean" over agreeing tasks (TIES) or "sum".
    """
    return _merge_family("ties", pretrained, finetuned, density=density, lam=lam, scope=scope, merge=merge)


@register("dare")
def dare(pretrained: StateDict, finetuned: Sequence[StateDict], drop: float = 0.5, base: str = "task_arithmetic",
         seed: int = 0, **base_kwargs) -> dict[str, Tensor]:
    """DARE: drop each task-vector entry with probability p, rescale by 1/(1−p), then merge (arXiv 2311.03099).

    Args:
        pretrained: θ0.
        finetuned: [θ_t], one state dict per task.
        drop: drop probability p in [0, 1).
        base: the merger applied after dropping: "task_arithmetic", "ties" or "simple_average".
        seed: seeds the drop masks (the result is a pure function of the inputs and the seed).
        **base_kwargs: options of the base merger (e.g. lam, density).
    """
    _check_dare_base(base)
    return _merge_family(base, pretrained, finetuned, drop=drop, seed=seed, **base_kwargs)
