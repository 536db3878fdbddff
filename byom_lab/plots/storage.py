"""Figures of what merging costs and buys: storage against T, the accuracy–storage Pareto picture, relative
accuracy against the number of tasks merged, and the interference behind it."""
import math
import re

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.transforms import Bbox

from .common import figure, method_label

SHORT_LABELS = [  # (pattern, replacement) applied in order to the headline table's method names
    (r"^zero-shot \(pretrained\)$", "zero-shot"), (r"^individual fine-tuned \((\w+)\)$", r"individual (\1)"),
    (r"^DARE \+ task arithmetic$", "DARE"), (r"^EMR-Merging$", "EMR"), (r"^post-pruning ", "post-prune "),
    (r"^BYOM-FFT on TIES ", "BYOM-FFT/TIES "), (r"m=", ""),
]


def short_label(method: str) -> str:
    """A headline-table method name short enough to print beside a point ("post-pruning m=5%" -> "post-prune 5%")."""
    for pattern, repl in SHORT_LABELS:
        method = re.sub(pattern, repl, method)
    return method


def _human_bytes(n: float) -> str:
    """1536 -> "1.5 KB" (powers of 1000, as storage is sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000


OFFSETS = [(6, 0, "left"), (6, 7, "left"), (6, -7, "left"), (-6, 0, "right"), (-6, 7, "right"), (-6, -7, "right"),
           (6, 14, "left"), (6, -14, "left"), (-6, 14, "right"), (-6, -14, "right")]  # (dx, dy) in points


def _place_labels(ax, xs, ys, labels, bold) -> list:
    """Annotate each point, trying the offsets of OFFSETS in turn until the label covers no earlier label,
    no other marker and not the legend (bold labels are placed first)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    r = 4 * fig.dpi / 72  # marker half-size in pixels
    markers = [Bbox([[px - r, py - r], [px + r, py + r]]) for px, py in points]
    legend = ax.get_legend()
    placed = [legend.get_window_extent(renderer)] if legend is not None else []
    texts = []
    order = sorted(range(len(points)), key=lambda i: (not bold[i], -ys[i]))
    for i in order:
        style = dict(fontsize=7, va="center", weight="bold" if bold[i] else "normal", color="k" if bold[i] else "0.4")
        others = placed + [m for j, m in enumerate(markers) if j != i]
        for dx, dy, ha in OFFSETS:
            text = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, **style)
            box = text.get_window_extent(renderer).expanded(1.04, 1.1)
            if not any(box.overlaps(other) for other in others):
                break
            text.remove()
        else:  # nowhere free: keep the first choice
            dx, dy, ha = OFFSETS[0]
            text = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, **style)
            box = text.get_window_extent(renderer)
        placed.append(box)
        texts.append(text)
    return texts


def storage_vs_tasks(totals, mark: int | None = None, ax=None):
    """Total bytes stored against the number of tasks T (linear axes: one straight line per method,
    intercept = shared bytes, slope = bytes per task); `mark` draws a vertical line at that T."""
    fig, ax = figure(ax)
    for i, (method, rows) in enumerate(totals.groupby("method", sort=False)):
        ax.plot(rows["T"], rows["total_bytes"], marker="o", ms=3, color=f"C{i}", label=method)
    if mark is not None:
        ax.axvline(mark, ls=":", lw=1, color="0.4")
    ax.set_ylim(0, None)
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: _human_bytes(v)))
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("T: number of tasks")
    ax.set_ylabel("total storage")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("What T tasks cost to store")
    fig.tight_layout()
    return fig


def pareto(table, front, cost: str = "extra_bytes_per_task", value: str = "average", family=None, ax=None):
    """Average accuracy against bytes stored per task (log), each group's Pareto front drawn as a staircase.

    Methods storing nothing per task sit on the "0" tick at the left. `front` is a boolean Series over
    the table's rows (analysis.storage.pareto_front); `family` optionally gives each row a group
    ("full fine-tunes", "LoRA fine-tunes") that sets its colour and its own front. Front rows are bold.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 5))
    fig = ax.figure
    data = table[[cost, value]].copy()
    positive = data[cost][data[cost] > 0]
    floor = 10 ** math.floor(math.log10(positive.min()) - 1) if len(positive) else 1.0
    data["x"] = data[cost].where(data[cost] > 0, floor)
    data["group"] = list(family[data.index]) if family is not None else "methods"
    data["front"] = front.reindex(data.index).fillna(False).astype(bool)
    for i, (name, rows) in enumerate(data.groupby("group", sort=False)):
        ax.scatter(rows["x"], rows[value], s=36, color=f"C{i}", label=name, zorder=3)
        on = rows[rows["front"]].sort_values("x")
        ax.step(on["x"], on[value], where="post", color=f"C{i}", lw=1.2, ls="--", zorder=2,
                label=f"Pareto front ({name})")
    ax.set_xscale("log")
    top = int(math.ceil(math.log10(data["x"].max())))
    ticks = [floor] + [10.0 ** e for e in range(int(round(math.log10(floor))) + 1, top + 1)]
    ax.set_xticks(ticks, ["0"] + [_human_bytes(t) for t in ticks[1:]])
    ax.set_xlim(floor / 2, data["x"].max() * 8)
    ax.set_ylim(data[value].min() - 4, data[value].max() + 4)
    ax.set_xlabel("extra bytes stored per task (log scale; 0 = nothing per task)")
    ax.set_ylabel("average accuracy (%)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Accuracy vs storage: bold methods are on their Pareto front")
    fig.tight_layout()
    _place_labels(ax, list(data["x"]), list(data[value]), [short_label(m) for m in data.index], list(data["front"]))
    return fig


def relative_vs_num_tasks(study, ax=None):
    """Mean normalised accuracy of the merged tasks against how many were merged (mean ± sd over orders)."""
    fig, ax = figure(ax)
    for i, (method, rows) in enumerate(study.groupby("method", sort=False)):
        stats = rows.groupby("k")["normalized_accuracy"].agg(["mean", "std"]).fillna(0.0)
        ax.errorbar(stats.index, 100 * stats["mean"], yerr=100 * stats["std"], marker="o", ms=4, capsize=3,
                    color=f"C{i}", label=method_label(method))
    ax.axhline(100, ls="--", lw=1, color="0.4", label="individual fine-tuned")
    ax.set_xlabel("k: number of tasks merged")
    ax.set_ylabel("normalized accuracy (%)")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Relative performance vs number of tasks")
    fig.tight_layout()
    return fig


def interference_growth(mech, study, fit: float, lam: float, density: float):
    """Why task arithmetic falls with k: (left) the interference ‖λ Σ_{s≠t} v_s‖/‖v_t‖ against k with its
    c·√(k−1) fit, next to ‖u_t‖/‖v_t‖ and what BYOM-FFT leaves, ‖u_t − top(u_t)‖/‖v_t‖; (right) each
    method's accuracy drop against √(k−1)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    per_k = mech.groupby("k")[["interference", "residual", "left_after_top"]].mean()
    ks = np.linspace(per_k.index.min(), per_k.index.max(), 50)
    left.plot(per_k.index, per_k["interference"], "o", color="C3", label=r"interference $\|\lambda\sum_{s\neq t}v_s\|$")
    left.plot(ks, fit * np.sqrt(ks - 1), "--", color="C3", lw=1, label=rf"fit ${fit:.2f}\sqrt{{k-1}}$")
    left.plot(per_k.index, per_k["residual"], "s-", color="C0", ms=4, label=r"task arithmetic: $\|u_t\|$")
    left.plot(per_k.index, per_k["left_after_top"], "^-", color="C1", ms=4,
              label=rf"BYOM-FFT: $\|u_t-\mathrm{{top}}(u_t)\|$, m = {100 * density:g}%")
    left.set_xlabel("k: number of tasks merged")
    left.set_ylabel(r"norm / $\|v_t\|$")
    left.legend(fontsize=7, loc="upper left")
    left.set_title(rf"What task $t$ loses in weight space ($\lambda$ = {lam:g})", fontsize=10)
    for i, (method, rows) in enumerate(study.groupby("method", sort=False)):
        drop = 100 * (1 - rows.groupby("k")["normalized_accuracy"].mean())
        right.plot(np.sqrt(drop.index - 1), drop, "o-", color=f"C{i}", ms=4, label=method_label(method))
    right.set_xlabel(r"$\sqrt{k-1}$")
    right.set_ylabel("accuracy drop (points of normalized acc.)")
    right.legend(fontsize=7, loc="upper left")
    right.set_title("What it costs in accuracy", fontsize=10)
    fig.tight_layout()
    return fig
