"""Figures of BYOM files on disk (lesson 08): where the bytes of each way of storing T tasks go, and the bytes per
task against m (BYOM-FFT) and q (BYOM-LoRA) beside their formulas."""
import matplotlib.pyplot as plt

from .common import figure

PART_ORDER = ["shared model", "full models", "adapters", "values", "indices", "U, S, V", "headers", "manifest"]
PART_COLOURS = {"shared model": "C0", "full models": "C7", "adapters": "C5", "values": "C2", "indices": "C1",
                "U, S, V": "C4", "headers": "C3", "manifest": "k"}


def megabytes(n: float) -> float:
    """Bytes in MB (10^6, as disks are sold)."""
    return n / 1e6


def where_bytes_go(parts, title: str = "Where the bytes go", ax=None):
    """One horizontal bar per way of storing the tasks, split into its parts (shared model, indices, values, …).

    `parts` is tidy (store, part, bytes), as `analysis.files.where_bytes_go` returns; bars keep its store order,
    segments follow PART_ORDER, and each bar ends with its total.
    """
    fig, ax = figure(ax, size=(10, 0.6 * parts["store"].nunique() + 1.6))
    stores = list(dict.fromkeys(parts["store"]))
    table = parts.pivot_table(index="store", columns="part", values="bytes", aggfunc="sum", fill_value=0)
    table = table.reindex(index=stores, columns=[p for p in PART_ORDER if p in table.columns]
                          + [p for p in table.columns if p not in PART_ORDER])
    left = [0.0] * len(stores)
    for part in table.columns:
        widths = [megabytes(b) for b in table[part]]
        ax.barh(range(len(stores)), widths, left=left, color=PART_COLOURS.get(part, "0.5"), label=part, height=0.6)
        left = [a + b for a, b in zip(left, widths)]
    for y, total in enumerate(left):
        ax.text(total, y, f"  {total:.1f} MB", va="center", fontsize=8)
    ax.set_yticks(range(len(stores)), stores, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.15)
    ax.set_xlabel("bytes on disk (MB)")
    ax.legend(fontsize=7, loc="lower right", ncol=2, frameon=True)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def bytes_per_task(sweep, model_bytes: float):
    """Bytes each task adds, measured from the files (points) on the formula (line): BYOM-FFT against m (left),
    BYOM-LoRA against q (right), with one full model (dashed) for scale; log y.

    `sweep` is `analysis.files.storage_sweep`'s table: method, setting, task_bytes (the tensors),
    task_file_bytes (header included) and formula_bytes.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    panels = [("byom_fft", "m: share of entries kept per task (%)", 100, r"formula $8\,mN$", "BYOM-FFT"),
              ("byom_lora", "q: rank kept per matrix", 1, r"formula $4\,q\sum(d_{out}+d_{in}+1)$", "BYOM-LoRA")]
    for ax, (method, xlabel, scale, formula, name) in zip(axes, panels):
        rows = sweep[sweep["method"] == method].sort_values("setting")
        x = rows["setting"] * scale
        ax.plot(x, megabytes(rows["formula_bytes"]), "-", color="C0", lw=1.5, label=formula)
        ax.plot(x, megabytes(rows["task_bytes"]), "o", color="C0", ms=5, label="tensors in the task file")
        ax.plot(x, megabytes(rows["task_file_bytes"]), "x", color="C3", ms=6, label="whole file (with header)")
        ax.axhline(megabytes(model_bytes), ls="--", color="0.4", lw=1, label="one full model")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(x), [f"{v:g}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_title(f"{name}: bytes per task", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, 0.9))
    axes[0].set_ylabel("bytes per task (MB, log)")
    fig.tight_layout()
    return fig
