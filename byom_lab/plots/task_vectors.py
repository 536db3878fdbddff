"""Figures of task vectors and task arithmetic: their norms and how they add, accuracy of each task
along λ, and how adding one task's vector changes another task's accuracy."""
import matplotlib.pyplot as plt
import seaborn as sns

from .common import figure, percent_axis


def norms_and_sum(norms, partial):
    """Left: ‖v_t‖ per task. Right: ‖Σ_{t≤k} v_t‖ against k, beside √(Σ‖v_t‖²) (right angles) and Σ‖v_t‖ (one direction)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.2]})
    sns.barplot(data=norms, x="task", y="norm", color="C0", ax=left)
    left.tick_params(axis="x", rotation=30, labelsize=8)
    for label in left.get_xticklabels():
        label.set_ha("right")
    left.set_xlabel("")
    left.set_ylabel("‖v_t‖")
    left.set_title("Norm of each task vector")
    k = partial["k"]
    right.plot(k, partial["sum_of_norms"], "--", color="0.5", label="Σ‖v_t‖ (all in one direction)")
    right.plot(k, partial["norm_of_sum"], "o-", color="C3", label="‖Σ v_t‖ (measured)")
    right.plot(k, partial["root_sum_of_squares"], ":", color="C0", lw=2, label="√(Σ‖v_t‖²) (at right angles)")
    right.set_xlabel("k: task vectors added")
    right.set_ylabel("norm")
    right.legend(fontsize=8)
    right.set_title("Adding task vectors: the norm grows like √k")
    fig.tight_layout()
    return fig


def lambda_per_task(sweep, chosen=None, value: str = "normalized_accuracy", ax=None):
    """Each task's accuracy against λ (thin lines, its best λ starred), the mean (thick), the chosen λ (dashed)."""
    fig, ax = figure(ax, size=(8, 4))
    for i, (task, g) in enumerate(sweep.groupby("task", sort=False)):
        g = g.sort_values("lam")
        ax.plot(g["lam"], g[value], lw=1.2, color=f"C{i % 10}", label=task)
        best = g.loc[g["accuracy"].idxmax()]
        ax.plot(best["lam"], best[value], "*", ms=11, color=f"C{i % 10}", mec="k", mew=0.5)
    mean = sweep.groupby("lam")[value].mean()
    ax.plot(mean.index, mean.values, color="k", lw=3, label="mean over tasks")
    if chosen is not None:
        ax.axvline(chosen, ls="--", color="0.4", label=f"chosen λ = {chosen:g}")
    ax.set_xlabel("λ")
    percent_axis(ax, "normalized accuracy (%)" if value == "normalized_accuracy" else "accuracy (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.set_title("One λ for every task: each task peaks somewhere else (★)")
    fig.tight_layout()
    return fig


def interference_heatmap(interference, ax=None):
    """Change of task t's accuracy (rows) when task s's vector (columns) is added to θ0 + λ v_t, in points."""
    fig, ax = figure(ax, size=(6.5, 5))
    order = list(dict.fromkeys(interference["task"]))
    grid = interference.pivot(index="task", columns="other", values="change").reindex(index=order, columns=order)
    points = (100 * grid).round(0) + 0.0  # + 0.0 turns -0 into 0
    limit = max(1.0, float(points.abs().max().max()))
    ax.grid(False)
    ax.set_facecolor("0.85")  # the diagonal (a task with itself) is left empty
    sns.heatmap(points, annot=True, fmt=".0f", cmap="RdBu", vmin=-limit, vmax=limit, square=True,
                ax=ax, annot_kws={"fontsize": 7}, cbar_kws={"label": "accuracy change (points)"})
    ax.set_xlabel("vector added: v_s")
    ax.set_ylabel("task evaluated: t")
    ax.set_title("Interference: adding another task's vector")
    fig.tight_layout()
    return fig
