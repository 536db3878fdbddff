"""Studies behind the notebooks: functions returning tidy DataFrames (one row per measurement)."""
import random

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import cache, merging
from .evaluation import evaluate
from .selection import select_lambda


def _check_sweep(values, name):
    values = list(values)
    if not values:
        raise ValueError(f"empty sweep: give at least one value for {name}")
    return values


def _frame(suite, models, split, **labels) -> pd.DataFrame:
    df = evaluate(suite, models, split)
    for k, v in labels.items():
        df.insert(0, k, v)
    return df


def cached_study(name: str, suite, config: dict, compute) -> pd.DataFrame:
    """Run compute() once per (suite, config) and keep its DataFrame as CSV in the cache."""
    key = {"study": name, "suite": suite.info["identity"], **config}
    path = cache.entry("studies", key) / f"{name}.csv"
    return cache.cached(path, lambda tmp: compute().to_csv(tmp, index=False), pd.read_csv)


def pruning_sweep(suite, densities=(0.01, 0.02, 0.05, 0.1, 0.2), base: str = "task_arithmetic", lam=None,
                  scope: str = "global", split: str = "test") -> pd.DataFrame:
    """Merge-then-prune (BYOM-FFT) vs prune-then-merge (post-pruning) over m; λ from validation."""
    densities = _check_sweep(densities, "densities")
    base_kwargs = {}
    if base in ("task_arithmetic", "ties"):
        base_kwargs["lam"] = lam if lam is not None else select_lambda(suite, base)[0]

    def compute():
        frames = []
        for d in tqdm(densities, desc="m sweep", leave=False):
            for label, result in (
                ("BYOM-FFT", merging.byom_fft(suite.pretrained, suite.finetuned, density=d, base=base, scope=scope, **base_kwargs)),
                ("post-pruning", merging.post_pruning(suite.pretrained, suite.finetuned, density=d, scope=scope)),
            ):
                frames.append(_frame(suite, result, split, extra_params=result.num_params(), m_percent=100 * d,
                                     density=d, method=label))
        return pd.concat(frames, ignore_index=True)

    return cached_study("pruning_sweep", suite, dict(densities=densities, base=base, scope=scope, split=split, **base_kwargs), compute)


def lora_rank_sweep(suite, ranks=(1, 2, 4, 8), base: str = "pretrained", split: str = "test") -> pd.DataFrame:
    """BYOM-LoRA accuracy for each rank q."""
    ranks = _check_sweep(ranks, "ranks")

    def compute():
        frames = []
        for q in tqdm(ranks, desc="q sweep", leave=False):
            result = merging.byom_lora(suite.pretrained, suite.lora, rank=q, base=base)
            frames.append(_frame(suite, result, split, extra_params=result.num_params(), rank=q, method=f"BYOM-LoRA ({base})"))
        return pd.concat(frames, ignore_index=True)

    return cached_study("lora_rank_sweep", suite, dict(ranks=ranks, base=base, split=split), compute)


def lora_rank_error(suite, ranks=(1, 2, 4, 8)) -> pd.DataFrame:
    """Relative error ‖ΔW − ΔW_q‖_F / ‖ΔW‖_F per task, layer and rank, from the singular values."""
    ranks = _check_sweep(ranks, "ranks")
    rows = []
    for t, lora in enumerate(suite.lora):
        for name, (b, a) in lora.items():
            s = merging.factored_svd(b, a)[1]
            total = float((s**2).sum())
            for q in ranks:
                if q > len(s):
                    raise ValueError(f"rank {q} exceeds the LoRA rank {len(s)} of {name!r}")
                err = (float((s[q:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
                rows.append({"task": suite.tasks[t], "layer": name, "rank": q, "relative_error": err})
    return pd.DataFrame(rows)


def _method_models(suite, method: str, pretrained, finetuned, lam):
    if method == "task_arithmetic":
        return merging.task_arithmetic(pretrained, finetuned, lam=lam)
    if method == "byom_fft":
        return merging.byom_fft(pretrained, finetuned, density=0.1, lam=lam)
    if method == "post_pruning":
        return merging.post_pruning(pretrained, finetuned, density=0.1)
    return merging.get_method(method)(pretrained, finetuned)


def num_tasks_study(suite, methods=("simple_average", "task_arithmetic", "byom_fft", "post_pruning"),
                    ks=None, orders: int = 3, lam: float = 0.3, seed: int = 0, split: str = "test") -> pd.DataFrame:
    """Merge the first k tasks of `orders` random task orders, k = 2..T; mean accuracy over those k tasks."""
    methods = _check_sweep(methods, "methods")
    n = len(suite.tasks)
    ks = _check_sweep(ks if ks is not None else range(2, n + 1), "ks")
    rng = random.Random(seed)
    perms = [rng.sample(range(n), n) for _ in range(orders)]

    def compute():
        rows = []
        for o, perm in enumerate(tqdm(perms, desc="orders", leave=False)):
            for k in ks:
                chosen = perm[:k]
                finetuned = [suite.finetuned[t] for t in chosen]
                for method in methods:
                    result = _method_models(suite, method, suite.pretrained, finetuned, lam)
                    accs = []
                    for j, t in enumerate(chosen):
                        sd = result.task_state_dict(j) if hasattr(result, "task_state_dict") else result
                        df = evaluate(suite, [sd] * n, split, tasks=[t])
                        accs.append(float(df["normalized_accuracy"].iloc[0]))
                    rows.append({"order": o, "k": k, "method": method, "normalized_accuracy": sum(accs) / k})
        return pd.DataFrame(rows)

    return cached_study("num_tasks", suite, dict(methods=methods, ks=ks, orders=orders, lam=lam, seed=seed, split=split), compute)


def base_merger_study(suite, bases=("simple_average", "task_arithmetic", "ties"), density: float = 0.1,
                      split: str = "test") -> pd.DataFrame:
    """Each base merger alone and with BYOM-FFT on top (the paper's 'add-on to any merger' claim)."""
    bases = _check_sweep(bases, "bases")

    def compute():
        frames = []
        for base in tqdm(bases, desc="bases", leave=False):
            kwargs = {"lam": select_lambda(suite, base)[0]} if base in ("task_arithmetic", "ties") else {}
            merged = merging.get_method(base)(suite.pretrained, suite.finetuned, **kwargs)
            merged = merged.merged if hasattr(merged, "merged") else merged
            frames.append(_frame(suite, merged, split, with_byom="no", base=base))
            byom = merging.byom_fft(suite.pretrained, suite.finetuned, density=density, base=base, **kwargs)
            frames.append(_frame(suite, byom, split, with_byom=f"BYOM-FFT m={100 * density:g}%", base=base))
        return pd.concat(frames, ignore_index=True)

    return cached_study("base_mergers", suite, dict(bases=bases, density=density, split=split), compute)


def pair_study(names=("tiny-similar", "tiny-dissimilar"), densities=(0.01, 0.05, 0.1), lam: float = 1.0,
               split: str = "test") -> pd.DataFrame:
    """Merging two similar vs two dissimilar tasks: task arithmetic and BYOM-FFT per pair."""
    from .suites import load_suite

    frames = []
    for name in _check_sweep(names, "names"):
        pair = load_suite(name)
        frames.append(_frame(pair, merging.task_arithmetic(pair.pretrained, pair.finetuned, lam=lam), split,
                             m_percent=0.0, method="task arithmetic", pair=name))
        for d in densities:
            result = merging.byom_fft(pair.pretrained, pair.finetuned, density=d, lam=lam)
            frames.append(_frame(pair, result, split, m_percent=100 * d, method="BYOM-FFT", pair=name))
    return pd.concat(frames, ignore_index=True)


def stack_lora(suite):
    """Dense LoRA-fine-tuned state dicts, one per task."""
    from .finetune import apply_lora

    return [apply_lora(suite.pretrained, lora) for lora in suite.lora]


def torch_threads() -> int:
    return torch.get_num_threads()
