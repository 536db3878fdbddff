"""Figures of what a suite is: each task's pictures beside its zero-shot confusions, accuracy per task,
captioned vs code-word classes, and how far fine-tuning moved each layer."""
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .common import figure, percent_axis


def _montage(suite, task: int, split: str = "test", cols: int = 5) -> np.ndarray:
    """One example image per class, classes in reading order on a grid of `cols` columns (H·rows, W·cols, 3)."""
    x, y = suite.data[suite.tasks[task]][split]
    n = len(suite.classes[task])
    rows = -(-n // cols)
    h, w = x.shape[-2:]
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for c in range(n):
        idx = (y == c).nonzero().flatten()
        if len(idx):
            r, k = divmod(c, cols)
            grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = x[int(idx[0])].permute(1, 2, 0).numpy()
    return grid


def task_confusions(suite, confusions: dict, captioned=None, split: str = "test"):
    """Per task (a column): one picture per class (reading order = class order) above its confusion matrix.

    `confusions` maps task name -> DataFrame of counts (rows true, columns predicted, as
    `analysis.anatomy.confusion_matrix` returns). Rows are shown as shares of each true class; with
    `captioned` (per suite task, a set of class indices) the captioned classes are marked "•".
    """
    tasks = list(confusions)
    fig, axes = plt.subplots(2, len(tasks), figsize=(2.5 * len(tasks), 3.8), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.9]})
    for j, task in enumerate(tasks):
        t = suite.task_index(task)
        cm = confusions[task]
        axes[0, j].imshow(_montage(suite, t, split))
        axes[0, j].axis("off")
        acc = np.trace(cm.values) / cm.values.sum()
        axes[0, j].set_title(f"{task}\nzero-shot {100 * acc:.0f}%", fontsize=9)
        share = cm.values / np.maximum(cm.values.sum(1, keepdims=True), 1)
        marks = captioned[t] if captioned is not None else set()
        labels = [f"{c} " + ("• " if c in marks else "") + str(name)[:10] for c, name in enumerate(cm.index)]
        sns.heatmap(share, ax=axes[1, j], cmap="Blues", vmin=0, vmax=1, cbar=False, square=True,
                    xticklabels=False, yticklabels=labels)
        axes[1, j].tick_params(axis="y", labelsize=6.5, length=0)
        axes[1, j].set_xlabel("predicted class (0 … 9)", fontsize=8)
        axes[1, j].set_ylabel("true class" if j == 0 else "", fontsize=8)
    fig.tight_layout(h_pad=0.3)
    return fig


def accuracy_by_task(table, hue: str = "model", title: str = "Accuracy per task", ax=None):
    """Grouped bars: accuracy (column `accuracy`, fractions) per task, one colour per value of `hue`."""
    fig, ax = figure(ax, size=(10, 3.5))
    sns.barplot(data=table, x="task", y="accuracy", hue=hue, ax=ax)
    ax.tick_params(axis="x", rotation=25, labelsize=8)
    for label in ax.get_xticklabels():
        label.set_ha("right")
    ax.set_xlabel("")
    ax.set_ylim(0, 1.2)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    percent_axis(ax, "accuracy (%)")
    ax.legend(fontsize=8, loc="upper center", ncol=4, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def captioned_vs_codeword(class_acc, ax=None):
    """Mean zero-shot accuracy per task of the classes named in pretraining captions vs those given code words."""
    fig, ax = figure(ax)
    data = class_acc.assign(classes=class_acc["captioned"].map({True: "named in captions", False: "code word only"}))
    sns.barplot(data=data, x="task", y="accuracy", hue="classes", hue_order=["named in captions", "code word only"],
                errorbar=None, ax=ax)
    ax.tick_params(axis="x", rotation=25, labelsize=8)
    for label in ax.get_xticklabels():
        label.set_ha("right")
    ax.set_xlabel("")
    ax.set_ylim(0, 1.05)
    percent_axis(ax, "mean accuracy of the classes (%)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Zero-shot knows the classes its captions named")
    fig.tight_layout()
    return fig


def drift_by_layer(drift, ax=None):
    """Relative change ‖θ_t − θ0‖ / ‖θ0‖ of each layer (network order), one line per task."""
    fig, ax = figure(ax, size=(8, 3.8))
    order = list(dict.fromkeys(drift["layer"]))
    sns.lineplot(data=drift, x="layer", y="relative", hue="task", marker="o", sort=False, ax=ax)
    ax.set_xticks(range(len(order)), order, rotation=25, ha="right", fontsize=8)
    ax.set_xlabel("")
    percent_axis(ax, "‖θ_t − θ0‖ / ‖θ0‖ (%)")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{100 * v:.1f}"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set_title("How far fine-tuning moved each layer")
    fig.tight_layout()
    return fig
