"""The data-using methods run as the table reports them: statistics from train, every choice on validation.

    Fisher, RegMean   statistics of 256 training images per task (cached), then the closed-form merge
    TALL masks        λ_t ∈ {0.2, …, 0.6} chosen per task on validation; α = 1 (the reference's)
    Consensus         the TALL masks at those λ_t, k = 2, λ chosen on validation (grid 0.1…1.0, the reference's)

Selections are cached under the digests of the models and of the validation images; only the
validation split is read.
"""
import json
import time

from .. import cache, memo
from ..evaluation import evaluate
from ..merging import consensus, fisher, regmean, tall_masks
from ..merging.tall import LAMBDAS
from .runs import run_key
from .statistics import N_IMAGES, fisher_statistics, gram_statistics, statistics_seconds

CONSENSUS_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))  # nik-dim/tall_masks: linspace(0, 1, 11)[1:]


def _val_key(kind: str, suite, settings: dict) -> dict:
    """A selection's cache key: the run key's model digests, with the validation images' digests."""
    key = run_key(kind, suite, settings, "val")
    key["data"] = [memo.tensors_digest(*suite.data[task]["val"]) for task in suite.tasks]
    return key


def _cached_scores(kind: str, suite, settings: dict, score) -> dict:
    """{value: score} computed once per (models, validation images, settings), as JSON in the cache."""
    path = cache.entry(kind, _val_key(kind, suite, settings)) / "scores.json"
    return cache.cached(path, lambda tmp: tmp.write_text(json.dumps(score())), lambda p: json.loads(p.read_text()))


def fisher_merge(suite, images: int = N_IMAGES) -> tuple[dict, dict]:
    """(θ*, info) of Fisher merging on `images` training images per task; info has the data used and seconds."""
    stats = fisher_statistics(suite, images)
    start = time.perf_counter()
    merged = fisher(suite.pretrained, suite.finetuned, stats)
    return merged, {"images": sum(s.images for s in stats), "split": "train (unlabeled: the model's own predictions)",
                    "seconds": statistics_seconds(stats) + time.perf_counter() - start, "steps": 0}


def regmean_merge(suite, alpha: float = 0.95, images: int = N_IMAGES) -> tuple[dict, dict]:
    """(θ*, info) of RegMean with off-diagonal factor α on `images` training images per task."""
    stats = gram_statistics(suite, images)
    start = time.perf_counter()
    merged = regmean(suite.pretrained, suite.finetuned, stats, alpha=alpha)
    return merged, {"images": sum(s.images for s in stats), "split": "train (unlabeled: layer inputs)",
                    "seconds": statistics_seconds(stats) + time.perf_counter() - start, "steps": 0}


def select_tall_lambdas(suite, base: str = "task_arithmetic", grid=LAMBDAS) -> tuple[list[float], dict]:
    """(λ_t per task, {λ: [validation accuracy per task]}): each task takes the λ best on its own validation split.

    Ties go to the smaller λ (the reference takes the first maximum of an ascending grid).
    """
    grid = [float(g) for g in grid]
    if not grid:
        raise ValueError("empty λ grid")

    def score():
        return {str(lam): evaluate(suite, tall_masks(suite.pretrained, suite.finetuned, lams=lam, base=base), "val")
                ["accuracy"].tolist() for lam in grid}

    scores = {float(k): v for k, v in _cached_scores("tall-lambda", suite, {"base": base, "grid": grid}, score).items()}
    best = [max(grid, key=lambda lam: (scores[lam][t], -lam)) for t in range(len(suite.tasks))]
    return best, scores


def tall_masks_on_val(suite, base: str = "task_arithmetic") -> tuple:
    """(TallMaskResult with λ_t chosen on validation, info with the seconds of building it)."""
    lams, _ = select_tall_lambdas(suite, base)
    start = time.perf_counter()
    result = tall_masks(suite.pretrained, suite.finetuned, lams=lams, base=base)
    return result, {"lams": lams, "seconds": time.perf_counter() - start, "steps": 0}


def consensus_on_val(suite, base: str = "task_arithmetic", k: int = 2, grid=CONSENSUS_GRID) -> tuple[dict, dict]:
    """(θ*, info) of Consensus merging: TALL λ_t and then λ chosen on validation."""
    lams, _ = select_tall_lambdas(suite, base)
    grid = [float(g) for g in grid]

    def score():
        return {str(lam): float(evaluate(suite, consensus(suite.pretrained, suite.finetuned, lams=lams, k=k, lam=lam,
                                                          base=base), "val")["accuracy"].mean()) for lam in grid}

    scores = _cached_scores("consensus-lambda", suite, {"base": base, "k": k, "grid": grid, "lams": lams}, score)
    lam = max(grid, key=lambda g: (scores[str(g)], -g))
    start = time.perf_counter()
    merged = consensus(suite.pretrained, suite.finetuned, lams=lams, k=k, lam=lam, base=base)
    return merged, {"lams": lams, "lam": lam, "seconds": time.perf_counter() - start, "steps": 0}
