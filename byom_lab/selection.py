"""Hyperparameters chosen on the validation split: λ grids, `select_lambda`, `select_ties`.

Tables, studies and notebooks all take their λ from here; only the validation split is read.
"""
import json

from tqdm.auto import tqdm

from . import cache, merging
from .evaluation import evaluate

LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))
TIES_DENSITIES = (0.1, 0.2)
TIES_LAMBDA_GRID = tuple(0.5 * i for i in range(1, 9))  # 0.5..4.0: TIES averages agreeing entries, so it wants a larger λ


def mean_accuracy(suite, models, split="val") -> float:
    """Mean accuracy over the suite's tasks."""
    return float(evaluate(suite, models, split)["accuracy"].mean())


def select_lambda(suite, method: str = "task_arithmetic", grid=LAMBDA_GRID, **kwargs):
    """λ maximising mean validation accuracy of merging.<method>(..., lam=λ); returns (λ, {λ: score}).

    Only the validation split is read. The scores are cached per suite, method, grid and options.
    """
    fn = merging.get_method(method)
    grid = [float(g) for g in grid]
    if not grid:
        raise ValueError("empty λ grid")

    def build(tmp):
        scores = {}
        for lam in tqdm(grid, desc=f"λ for {method}", leave=False):
            models = fn(suite.pretrained, suite.finetuned, lam=lam, **kwargs)
            scores[lam] = mean_accuracy(suite, models, "val")
        tmp.write_text(json.dumps(list(scores.items())))

    key = {"method": method, "grid": grid, "kwargs": kwargs, "suite": suite.info["identity"]}
    path = cache.entry("lambda", key) / "scores.json"
    scores = dict(cache.cached(path, build, lambda p: [tuple(x) for x in json.loads(p.read_text())]))
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


def select_ties(suite, densities=TIES_DENSITIES, grid=TIES_LAMBDA_GRID):
    """(density, λ) of TIES maximising mean validation accuracy."""
    best = None
    for d in densities:
        lam, scores = select_lambda(suite, "ties", grid=grid, density=d)
        if best is None or scores[lam] > best[2]:
            best = (d, lam, scores[lam])
    return best[0], best[1]
