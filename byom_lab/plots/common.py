"""Shared pieces of every figure: the theme, method labels, percent axes, a figure-or-axes helper."""
import matplotlib.pyplot as plt
import seaborn as sns

sns.set_theme(context="notebook", style="whitegrid")


METHOD_LABELS = {
    "simple_average": "simple average", "task_arithmetic": "task arithmetic", "ties": "TIES", "dare": "DARE",
    "byom_fft": "BYOM-FFT", "post_pruning": "post-pruning (prune-then-merge)", "byom_lora": "BYOM-LoRA",
    "emr": "EMR-Merging",
}


def method_label(name: str) -> str:
    """How a registered method name reads in a figure ("task_arithmetic" -> "task arithmetic")."""
    return METHOD_LABELS.get(name, name.replace("_", " "))


def percent(value: float) -> str:
    """A percentage the way a paper writes it: 63, 5, 1.6, 0.1 (two significant digits below 10)."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def figure(ax, size=(6, 4)):
    """(figure, axes): a new figure of `size` inches, or the given axes and their figure, left as they are."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size)
    return fig, ax


def mean_by(df, keys, value="accuracy"):
    """Mean of `value` per group of `keys`, as a flat DataFrame."""
    return df.groupby(keys, as_index=False)[value].mean()


def percent_axis(ax, label="average accuracy (%)"):
    """Label the y axis and show fractions in [0, 1] as percentages."""
    ax.set_ylabel(label)
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{100 * v:.0f}"))
