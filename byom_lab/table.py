"""The headline results table: every method on every task of a suite, hyperparameters from val."""
import functools

import pandas as pd
from tqdm.auto import tqdm

from . import merging
from .evaluation import evaluate
from .finetune import apply_lora
from .selection import LAMBDA_GRID, TIES_DENSITIES, TIES_LAMBDA_GRID, select_lambda, select_ties

DENSITIES = (0.01, 0.05, 0.10)


def _row(suite, label, models, split, extra_params=0, **hyper):
    df = evaluate(suite, models, split)
    row = {"method": label, **dict(zip(df["task"], 100 * df["accuracy"]))}
    row["average"] = 100 * df["accuracy"].mean()
    row["normalized"] = 100 * df["normalized_accuracy"].mean()
    row["extra_params_per_task"] = extra_params
    if hasattr(models, "nbytes") and callable(models.nbytes):  # a result object: its stored extras
        row["extra_bytes_per_task"] = models.nbytes()
    else:  # dense copies (individual models) in the backbone's dtype
        row["extra_bytes_per_task"] = extra_params * next(iter(suite.pretrained.values())).element_size()
    row["hyperparameters"] = ", ".join(f"{k}={v}" for k, v in hyper.items())
    return row


def headline_table(suite, split: str = "test", densities=DENSITIES, lambda_grid=LAMBDA_GRID,
                   ties_densities=TIES_DENSITIES, ties_grid=TIES_LAMBDA_GRID, ranks=None,
                   data_methods: bool = False) -> pd.DataFrame:
    """The paper's main table for a suite: one row per method, accuracy per task, averages, storage.

    Hyperparameters (λ of task arithmetic and of the BYOM-FFT base, TIES density and λ) are chosen on
    the validation split; each row says which it used. `data_methods=True` adds the methods that use
    data (Fisher, RegMean, TALL masks, Consensus, AdaMerging, Model Tinting) and, for every row, the
    data it used, its optimisation steps, its seconds and its accuracy on a held-out half of the test
    split (byom_lab.adaptation.report); slow the first time, cached afterwards.
    """
    n_params = sum(v.numel() for v in suite.pretrained.values())
    pre, fts = suite.pretrained, suite.finetuned
    lam, _ = select_lambda(suite, grid=lambda_grid)
    t_density, t_lam = select_ties(suite, ties_densities, ties_grid)
    lora_rank = min(b.shape[1] for b, _ in suite.lora[0].values()) if suite.lora else 0
    ranks = ranks if ranks is not None else sorted({1, 2, 4, max(1, lora_rank // 2)} & set(range(1, lora_rank + 1)))
    rows = [
        _row(suite, "zero-shot (pretrained)", pre, split),
        _row(suite, "individual fine-tuned (full)", fts, split, n_params),
    ]
    if suite.lora:
        rows.append(_row(suite, "individual fine-tuned (LoRA)", [apply_lora(pre, l) for l in suite.lora], split,
                         sum(b.numel() + a.numel() for b, a in suite.lora[0].values()), r=lora_rank))
    rows += [
        _row(suite, "simple average", merging.simple_average(pre, fts), split),
        _row(suite, "task arithmetic", merging.task_arithmetic(pre, fts, lam=lam), split, lam=lam),
        _row(suite, "TIES", merging.ties(pre, fts, density=t_density, lam=t_lam), split, density=t_density, lam=t_lam),
        _row(suite, "DARE + task arithmetic", merging.dare(pre, fts, drop=0.5, lam=lam), split, drop=0.5, lam=lam, seed=0),
    ]
    emr = merging.emr(pre, fts)
    rows.append(_row(suite, "EMR-Merging", emr, split, emr.num_params()))
    for d in tqdm(densities, desc="pruning", leave=False):
        m = f"{100 * d:g}%"
        post = merging.post_pruning(pre, fts, density=d)
        rows.append(_row(suite, f"post-pruning m={m}", post, split, post.num_params()))
        byom = merging.byom_fft(pre, fts, density=d, base="task_arithmetic", lam=lam)
        rows.append(_row(suite, f"BYOM-FFT m={m}", byom, split, byom.num_params(), lam=lam))
    d = max(densities)
    byom_ties = merging.byom_fft(pre, fts, density=d, base=functools.partial(merging.ties, density=t_density), lam=t_lam)
    rows.append(_row(suite, f"BYOM-FFT on TIES m={100 * d:g}%", byom_ties, split, byom_ties.num_params(),
                     ties_density=t_density, lam=t_lam))
    for q in ranks:
        result = merging.byom_lora(pre, suite.lora, rank=q)
        rows.append(_row(suite, f"BYOM-LoRA q={q}", result, split, result.num_params()))
    table = pd.DataFrame(rows).set_index("method")
    if data_methods:
        from .adaptation.report import add_data_methods

        table = add_data_methods(suite, table, split)
    return table
