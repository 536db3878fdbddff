"""Figures of the methods that use data: per-task before/after, the accuracy–bytes–data map, curves and λ."""
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .common import figure, percent_axis

FAMILY_STYLE = {  # marker and colour per family: what the method needs
    "nothing": ("o", "C0"), "storage": ("s", "C2"), "training data": ("^", "C1"), "unlabeled test data": ("D", "C3"),
}


def per_task_bars(long, reference: str = None, ax=None):
    """Per-task accuracy of several methods side by side (`long`: method, task, accuracy), `reference` drawn as ticks."""
    fig, ax = (plt.subplots(figsize=(10, 3.5)) if ax is None else (ax.figure, ax))
    methods = [m for m in long["method"].unique() if m != reference]
    tasks = list(dict.fromkeys(long["task"]))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        acc = long[long["method"] == m].set_index("task").loc[tasks, "accuracy"]
        ax.bar(np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width, acc, width=width, label=m)
    if reference is not None:
        acc = long[long["method"] == reference].set_index("task").loc[tasks, "accuracy"]
        ax.scatter(np.arange(len(tasks)), acc, marker="_", s=400, color="k", zorder=3, label=reference)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    percent_axis(ax, "accuracy (%)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=len(methods) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _spread(values, gap):
    """Label positions near `values`, in the same order, at least `gap` apart (pushed upwards)."""
    order = np.argsort(values)
    out = np.asarray(values, float).copy()
    for prev, cur in zip(order, order[1:]):
        out[cur] = max(out[cur], out[prev] + gap)
    return out


def accuracy_bytes_data(table, ax=None):
    """Average accuracy against extra bytes stored per task (symlog), one marker per family of data used.

    `table` has columns family, average, extra_bytes_per_task (index: method). Labels of methods that
    store the same bytes are spread vertically so they stay readable.
    """
    fig, ax = (plt.subplots(figsize=(10, 4.5)) if ax is None else (ax.figure, ax))
    for family, (marker, color) in FAMILY_STYLE.items():
        part = table[table["family"] == family]
        if len(part):
            ax.scatter(part["extra_bytes_per_task"], part["average"], marker=marker, color=color, s=45, label=family)
    gap = 0.035 * (table["average"].max() - table["average"].min() + 1)
    for _, group in table.groupby("extra_bytes_per_task"):
        for (name, row), y in zip(group.iterrows(), _spread(group["average"].to_numpy(), gap)):
            ax.annotate(name, (row["extra_bytes_per_task"], row["average"]), xytext=(8, y),
                        textcoords=("offset points", "data"), fontsize=7, ha="left", va="center",
                        arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5, shrinkA=0, shrinkB=3))
    ax.set_xscale("symlog", linthresh=1e3)
    names = {0: "0", 1e3: "1 kB", 1e4: "10 kB", 1e5: "100 kB", 1e6: "1 MB", 1e7: "10 MB", 1e8: "100 MB", 1e9: "1 GB"}
    ticks = [t for t in names if t < max(table["extra_bytes_per_task"].max(), 1e3) * 20]
    ax.set_xticks(ticks, [names[t] for t in ticks])
    ax.set_xlim(-200, ticks[-1] * 2)
    ax.set_xlabel("extra bytes stored per task (symlog; 0 = one shared model)")
    ax.set_ylabel("average test accuracy (%)")
    ax.legend(title="needs", fontsize=8, loc="lower right")
    ax.set_title("What each method pays: storage, training data, or unlabeled test data")
    fig.tight_layout()
    return fig


def training_curves(histories: dict, window: int = 10, ax=None):
    """Training loss per optimisation step (moving average over `window` steps) for {label: losses}."""
    fig, ax = figure(ax)
    for label, losses in histories.items():
        y = np.convolve(np.asarray(losses, float), np.ones(window) / window, mode="valid") if len(losses) >= window else losses
        ax.plot(np.arange(len(y)) + (len(losses) - len(y)), y, label=label)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(f"training loss (mean of {window} steps)")
    ax.legend(fontsize=8)
    ax.set_title("Test-time training")
    return fig


def lambda_heatmap(frame, tasks, start: float = None, ax=None):
    """λ per tensor (rows, grouped by block) and task (columns) from `analysis.lambda_frame`.

    With `start`, the change λ − start is drawn on a diverging scale (red: up, blue: down).
    """
    fig, ax = (plt.subplots(figsize=(6, 5)) if ax is None else (ax.figure, ax))
    data = frame.drop(columns="block").to_numpy()
    if start is None:
        sns.heatmap(data, cmap="viridis", vmin=0, vmax=1, ax=ax, cbar_kws={"label": "λ"}, yticklabels=False)
        ax.set_title("λ learned per tensor and task")
    else:
        bound = max(float(np.abs(data - start).max()), 1e-6)
        sns.heatmap(data - start, cmap="coolwarm", vmin=-bound, vmax=bound, ax=ax, yticklabels=False,
                    cbar_kws={"label": f"λ − {start:g}"})
        ax.set_title("How far λ moved, per tensor and task")
    blocks = frame["block"].tolist()
    ticks = [i for i, b in enumerate(blocks) if i == 0 or blocks[i - 1] != b]
    names = {-1: "stem, proj"}
    ax.set_yticks([t + 0.5 for t in ticks], [("ln_post" if blocks[t] < 0 and t > 0 else names.get(blocks[t], f"block {blocks[t]}"))
                                            for t in ticks], fontsize=7)
    ax.set_xticks([i + 0.5 for i in range(len(tasks))], list(tasks), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def mask_count_bars(counts, ax=None):
    """How many parameters are active in k TALL masks, k = 0..T; Consensus keeps k ≥ 2."""
    fig, ax = figure(ax)
    colors = ["0.6" if k < 2 else "C2" for k in counts.index]
    ax.bar(counts.index, counts.values / counts.values.sum(), color=colors)
    ax.set_xlabel("k: number of tasks whose TALL mask keeps the parameter")
    percent_axis(ax, "share of parameters (%)")
    ax.set_title("Consensus keeps the green bars (k ≥ 2)")
    return fig
