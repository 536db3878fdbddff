"""The whole trade in one table: each method's accuracy beside the data, steps, seconds and bytes it cost.

`data_method_rows` runs every data-using method the way `protocol` and the adaptation modules
define it (statistics from train, choices on validation, test-time methods on the unlabeled test
images) and `add_data_methods` joins them, with the same accounting for the data-free rows, to
`byom_lab.table.headline_table` (`headline_table(suite, data_methods=True)`, `byom-lab table
--data-methods`). Test-time methods are scored twice: adapted on the test images they are scored
on (the papers' protocol), and adapted on the first half of each test split, scored on the second.
"""
import functools
import re
import time

import pandas as pd

from .. import merging
from ..evaluation import evaluate, predictions
from ..finetune import apply_lora
from ..selection import select_lambda, select_ties
from .adamerging import adamerging, adamerging_plus
from .protocol import consensus_on_val, fisher_merge, regmean_merge, tall_masks_on_val
from .tinting import tinting, tinting_plus

FAMILIES = ("nothing", "storage", "training data", "unlabeled test data")


def held_out_half(suite, models) -> tuple[float, float]:
    """(mean accuracy, mean normalized accuracy) on the second half of every task's test split."""
    heads = getattr(models, "task_head", None)
    accs, norms = [], []
    for t in range(len(suite.tasks)):
        if hasattr(models, "task_state_dict"):
            sd = models.task_state_dict(t)
        else:
            sd = models[t] if isinstance(models, (list, tuple)) else models
        pred, y = predictions(suite, sd, t, "test", head=heads(t) if heads else None)
        ref, ry = predictions(suite, suite.finetuned[t], t, "test")
        half = len(y) // 2
        acc = float((pred[half:] == y[half:]).float().mean())
        accs.append(acc)
        norms.append(acc / float((ref[half:] == ry[half:]).float().mean()))
    return 100 * sum(accs) / len(accs), 100 * sum(norms) / len(norms)


def _count(suite, split: str) -> int:
    return sum(len(suite.data[t][split][1]) for t in suite.tasks)


def _scored(suite, label, models, split, cost: dict, half_models=None, **hyper) -> dict:
    """One row: accuracy per task, averages, held-out half, and the accounting columns of `cost`.

    `cost` holds family, data (in words), steps and seconds; `hyper` the settings shown in the row.
    """
    df = evaluate(suite, models, split)
    row = {"method": label, **dict(zip(df["task"], 100 * df["accuracy"]))}
    row["average"], row["normalized"] = 100 * df["accuracy"].mean(), 100 * df["normalized_accuracy"].mean()
    extra = models.num_params() if hasattr(models, "num_params") else 0
    row["extra_params_per_task"] = extra
    row["extra_bytes_per_task"] = models.nbytes() if hasattr(models, "nbytes") else 0
    row["hyperparameters"] = ", ".join(f"{k}={v}" for k, v in hyper.items())
    row["held_out_half"], row["held_out_normalized"] = held_out_half(suite, half_models or models)
    row.update(family=cost["family"], data=cost["data"], steps=cost["steps"], seconds=round(cost["seconds"], 2))
    return row


def _timed(build):
    start = time.perf_counter()
    out = build()
    return out, time.perf_counter() - start


def data_free_builders(suite) -> dict:
    """{headline row label pattern: (family, data, build(match) -> models)} for the data-free rows."""
    pre, fts = suite.pretrained, suite.finetuned
    lam = functools.cache(lambda: select_lambda(suite)[0])  # chosen on validation (cached), when a row needs it
    ties = functools.cache(lambda: select_ties(suite))
    val = f"val labels: {_count(suite, 'val')} images"
    return {
        r"zero-shot \(pretrained\)": ("nothing", "none", lambda m: pre),
        r"individual fine-tuned \(full\)": ("storage", "none (a whole model per task)", lambda m: fts),
        r"individual fine-tuned \(LoRA\)": ("storage", "none (a LoRA per task)", lambda m: [apply_lora(pre, lo) for lo in suite.lora]),
        r"simple average": ("nothing", "none", lambda m: merging.simple_average(pre, fts)),
        r"task arithmetic": ("nothing", f"{val} (λ)", lambda m: merging.task_arithmetic(pre, fts, lam=lam())),
        r"TIES": ("nothing", f"{val} (density, λ)", lambda m: merging.ties(pre, fts, density=ties()[0], lam=ties()[1])),
        r"DARE \+ task arithmetic": ("nothing", f"{val} (λ)", lambda m: merging.dare(pre, fts, drop=0.5, lam=lam())),
        r"EMR-Merging": ("storage", "none", lambda m: merging.emr(pre, fts)),
        r"post-pruning m=([\d.]+)%": ("storage", "none", lambda m: merging.post_pruning(pre, fts, density=float(m[1]) / 100)),
        r"BYOM-FFT m=([\d.]+)%": ("storage", f"{val} (λ)",
                                  lambda m: merging.byom_fft(pre, fts, density=float(m[1]) / 100, lam=lam())),
        r"BYOM-FFT on TIES m=([\d.]+)%": ("storage", f"{val} (density, λ)", lambda m: merging.byom_fft(
            pre, fts, density=float(m[1]) / 100, base=functools.partial(merging.ties, density=ties()[0]), lam=ties()[1])),
        r"BYOM-LoRA q=(\d+)": ("storage", "none", lambda m: merging.byom_lora(pre, suite.lora, rank=int(m[1]))),
    }


def data_free_accounting(suite, labels) -> pd.DataFrame:
    """family, data, steps, seconds (the merge, rebuilt and timed) and held-out half of headline rows."""
    builders, rows = data_free_builders(suite), []
    for label in labels:
        found = next(((p, b) for p, b in builders.items() if re.fullmatch(p, label)), None)
        if found is None:
            continue
        pattern, (family, data, build) = found
        models, seconds = _timed(lambda: build(re.fullmatch(pattern, label)))
        half, half_norm = held_out_half(suite, models)
        rows.append({"method": label, "family": family, "data": data, "steps": 0, "seconds": round(seconds, 2),
                     "held_out_half": half, "held_out_normalized": half_norm})
    return pd.DataFrame(rows).set_index("method")


def _test_time_rows(suite, split: str) -> list[dict]:
    runs = [("AdaMerging (task-wise)", adamerging, dict(granularity="task")),
            ("AdaMerging (layer-wise)", adamerging, {}),
            ("AdaMerging++ (layer-wise)", adamerging_plus, {}),
            ("Model Tinting", tinting, {}), ("Tinting++", tinting_plus, {})]
    rows = []
    for label, fn, options in runs:
        full, half = fn(suite, part="all", **options), fn(suite, part="first_half", **options)
        extra = " + the individual models (pseudo-labels)" if "uses" in full.info else ""
        data = f"test: {full.info['images']} images, unlabeled{extra}" + ("; scored on them" if split == "test" else "")
        cost = dict(family="unlabeled test data", data=data, steps=full.info["steps"], seconds=full.info["seconds"])
        shown = {k: v for k, v in full.info["config"].items() if k in ("granularity", "steps", "epochs", "lr")}
        rows.append(_scored(suite, label, full, split, cost, half_models=half, **shown, init=full.info["init"],
                            cpu_seconds=full.info["cpu_seconds"], half_seconds=half.info["seconds"]))
    return rows


def data_method_rows(suite, split: str = "test") -> list[dict]:
    """The data-using methods, each a row with the table's columns and its accounting."""
    train, val = "train: {} images, no labels", f"val labels: {_count(suite, 'val')} images"
    rows = []
    merged, info = fisher_merge(suite)
    cost = dict(family="training data", data=train.format(info["images"]), steps=0, seconds=info["seconds"])
    rows.append(_scored(suite, "Fisher merging", merged, split, cost, images_per_task=info["images"] // len(suite.tasks)))
    for alpha in (0.95,):
        merged, info = regmean_merge(suite, alpha)
        cost = dict(family="training data", data=train.format(info["images"]), steps=0, seconds=info["seconds"])
        rows.append(_scored(suite, "RegMean", merged, split, cost, alpha=alpha))
    for base, name in (("task_arithmetic", "TA"), ("ties", "TIES")):
        result, info = tall_masks_on_val(suite, base)
        cost = dict(family="storage", data=f"{val} (λ_t)", steps=0, seconds=info["seconds"])
        rows.append(_scored(suite, f"TALL masks ({name})", result, split, cost, lams=info["lams"]))
        merged, info = consensus_on_val(suite, base)
        cost = dict(family="nothing", data=f"{val} (λ_t, λ)", steps=0, seconds=info["seconds"])
        rows.append(_scored(suite, f"Consensus ({name})", merged, split, cost, lam=info["lam"]))
    tall = tall_masks_on_val(suite)[0]
    density = tall.nbytes() / (8 * sum(v.numel() for v in suite.pretrained.values()))  # 8 bytes per kept entry
    lam = select_lambda(suite)[0]
    byom, seconds = _timed(lambda: merging.byom_fft(suite.pretrained, suite.finetuned, density=density, lam=lam))
    cost = dict(family="storage", data=f"{val} (λ)", steps=0, seconds=seconds)
    rows.append(_scored(suite, f"BYOM-FFT m={100 * density:.2g}% (TALL's bytes)", byom, split, cost, lam=lam))
    return rows + _test_time_rows(suite, split)


def add_data_methods(suite, table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """`table` (headline rows) with the accounting columns filled in and the data-using rows appended."""
    accounting = data_free_accounting(suite, list(table.index))
    table = table.join(accounting)
    new = pd.DataFrame(data_method_rows(suite, split)).set_index("method")
    columns = [c for c in table.columns if c != "hyperparameters"]
    columns += [c for c in new.columns if c not in columns and c != "hyperparameters"] + ["hyperparameters"]
    return pd.concat([table, new])[columns]
