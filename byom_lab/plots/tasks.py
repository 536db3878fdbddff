"""Figures of the tasks themselves: example images, and how alike their task vectors are."""
import matplotlib.pyplot as plt
import seaborn as sns

from .common import figure


def task_gallery(suite, split: str = "test", per_class: int = 1, max_classes: int = 10):
    """One row per task, one example image per class, titled with the class name."""
    n_tasks = len(suite.tasks)
    cols = min(max_classes, max(len(c) for c in suite.classes)) * per_class
    fig, axes = plt.subplots(n_tasks, cols, figsize=(1.1 * cols, 1.25 * n_tasks), squeeze=False)
    for t, task in enumerate(suite.tasks):
        x, y = suite.data[task][split]
        for ax in axes[t]:
            ax.axis("off")
        for c, name in enumerate(suite.classes[t][:max_classes]):
            idx = (y == c).nonzero().flatten()[:per_class]
            for j, i in enumerate(idx.tolist()):
                ax = axes[t, c * per_class + j]
                ax.imshow(x[i].permute(1, 2, 0).numpy())
                ax.set_title(name[:12], fontsize=7)
        axes[t, 0].text(-0.15, 0.5, task, transform=axes[t, 0].transAxes, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def task_vector_similarity(vectors, names):
    """DataFrame of cosine similarities between flattened task vectors."""
    import pandas as pd
    import torch

    flat = torch.stack([torch.cat([v[k].reshape(-1).double() for k in sorted(v)]) for v in vectors])  # float64: 4.8M-term sums
    flat = torch.nn.functional.normalize(flat, dim=1)
    return pd.DataFrame((flat @ flat.T).numpy(), index=list(names), columns=list(names))


def similarity_heatmap(similarity, ax=None):
    """Heatmap of a task-by-task similarity DataFrame."""
    fig, ax = figure(ax)
    sns.heatmap(similarity, annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=1, square=True, ax=ax,
                annot_kws={"fontsize": 7}, cbar_kws={"label": "cosine similarity"})
    ax.set_title("Cosine similarity of task vectors")
    fig.tight_layout()
    return fig
