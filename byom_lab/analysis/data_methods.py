"""Measurements behind lesson 07: what the data-using methods learned, and what they cost, as DataFrames."""
import pandas as pd
import torch

from ..evaluation import evaluate, predictions


def per_task_accuracy(suite, models: dict, split: str = "test") -> pd.DataFrame:
    """Long table (method, task, accuracy) for {label: state dict, list of them, or result}."""
    frames = []
    for label, m in models.items():
        df = evaluate(suite, m, split)
        df.insert(0, "method", label)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def lambda_frame(result) -> pd.DataFrame:
    """λ learned per tensor and task (rows: tensors in model order, with their block; columns: tasks)."""
    lam = result.lambdas.numpy()
    blocks = [int(k.split(".")[2]) if k.startswith("transformer.resblocks.") else -1 for k in result.keys]
    df = pd.DataFrame(lam, index=result.keys, columns=range(lam.shape[1]))
    df.insert(0, "block", blocks)
    return df


def head_change(suite, result) -> pd.DataFrame:
    """Per task: how far Model Tinting moved its head, ‖W_t − s·h_t‖ / ‖s·h_t‖, and the cosine between them."""
    rows = []
    for t, task in enumerate(suite.tasks):
        start, end = suite.logit_scale * suite.heads[t], result.task_head(t)
        rows.append({"task": task, "relative_change": float((end - start).norm() / start.norm()),
                     "cosine": float(torch.nn.functional.cosine_similarity(end.flatten(), start.flatten(), dim=0))})
    return pd.DataFrame(rows)


def pseudo_label_accuracy(suite, part: str = "all") -> pd.DataFrame:
    """Per task: how often the individual model's pseudo-label (its prediction) is the true label on the test images."""
    rows = []
    for t, task in enumerate(suite.tasks):
        pred, y = predictions(suite, suite.finetuned[t], t, "test")
        n = len(y) // 2 if part == "first_half" else len(y)
        rows.append({"task": task, "pseudo_label_accuracy": float((pred[:n] == y[:n]).float().mean()), "images": n})
    return pd.DataFrame(rows)


def mask_counts(result) -> pd.Series:
    """How many parameters are active in exactly k of the TALL masks, k = 0..T (Consensus keeps k ≥ 2)."""
    total = None
    for t in range(result.num_tasks):
        counts = torch.cat([m.reshape(-1).int() for m in result.mask(t).values()])
        total = counts if total is None else total + counts
    return pd.Series(torch.bincount(total, minlength=result.num_tasks + 1).tolist(), name="parameters").rename_axis("k")


def mask_density(suite, result) -> pd.DataFrame:
    """Per task: the fraction of parameters its TALL mask keeps."""
    rows = []
    for t, task in enumerate(suite.tasks):
        mask = result.mask(t)
        kept = sum(int(m.sum()) for m in mask.values())
        rows.append({"task": task, "kept_fraction": kept / sum(m.numel() for m in mask.values())})
    return pd.DataFrame(rows)


def trade_table(suite, entries: dict, split: str = "test") -> pd.DataFrame:
    """One row per method: what it needs, what it scores, what it stores and what it cost to build.

    `entries` maps a label to a dict with `models` (anything `bl.evaluate` takes), `family` and `data`
    (what it read, in words), and optionally `images`, `steps`, `seconds` and `bytes` (extra bytes
    per task). An adaptation result fills images, steps and seconds from its `.info`; `bytes`
    defaults to the result's `nbytes()`, 0 for one shared model.
    """
    rows = []
    for label, e in entries.items():
        models, info = e["models"], getattr(e["models"], "info", {})
        df = evaluate(suite, models, split)
        rows.append({"method": label, "family": e["family"], "average": 100 * df["accuracy"].mean(),
                     "normalized": 100 * df["normalized_accuracy"].mean(),
                     "extra_bytes_per_task": e.get("bytes", models.nbytes() if hasattr(models, "nbytes") else 0),
                     "data": e["data"], "images": e.get("images", info.get("images", 0)),
                     "steps": e.get("steps", info.get("steps", 0)), "seconds": e.get("seconds", info.get("seconds", 0.0))})
    return pd.DataFrame(rows).set_index("method")


def regmean_vs_least_squares(seed: int = 0, d_in: int = 16, d_out: int = 8, rows: int = 200, tasks: int = 3) -> pd.Series:
    """RegMean (α = 1) against least squares on the stacked inputs of a random linear layer: agreement and seconds."""
    from ..merging import regmean
    from .oracle import compare

    gen = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(d_out, d_in, generator=gen)}
    fts = [{"w": pre["w"] + torch.randn(d_out, d_in, generator=gen)} for _ in range(tasks)]
    xs = [torch.randn(rows, d_in, generator=gen) for _ in range(tasks)]  # (rows, d_in) inputs seen by each model
    grams = [{"w": x.T @ x / rows} for x in xs]
    X, Y = torch.cat(xs), torch.cat([x @ f["w"].T for x, f in zip(xs, fts)])  # stacked regressions
    return compare(lambda: {"w": torch.linalg.lstsq(X, Y).solution.T}, lambda: regmean(pre, fts, grams, alpha=1.0))
