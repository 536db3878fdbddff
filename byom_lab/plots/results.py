"""Figures of results: accuracy against m, q, λ, number of tasks and storage; the widget panel's bars."""
import matplotlib.pyplot as plt
import seaborn as sns

from .common import figure, mean_by, percent_axis


def accuracy_vs_m(sweep, reference=None, ax=None):
    """Merge-then-prune vs prune-then-merge: mean accuracy against m (% of parameters kept per task).

    `reference` optionally maps a label (e.g. "individual", "task arithmetic") to a mean accuracy
    drawn as a horizontal line.
    """
    fig, ax = figure(ax)
    data = mean_by(sweep, ["method", "m_percent"])
    sns.lineplot(data=data, x="m_percent", y="accuracy", hue="method", marker="o", ax=ax)
    for i, (label, value) in enumerate((reference or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{i + 2}", label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted(data["m_percent"].unique()))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("m: parameters kept per task (%)")
    percent_axis(ax)
    ax.legend()
    ax.set_title("Merge-then-prune (BYOM-FFT) vs prune-then-merge")
    return fig


def accuracy_vs_rank(sweep, ax=None):
    """BYOM-LoRA mean accuracy against the kept rank q."""
    fig, ax = figure(ax)
    data = mean_by(sweep, ["method", "rank"])
    sns.lineplot(data=data, x="rank", y="accuracy", hue="method", marker="o", ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("q: rank kept per LoRA matrix")
    percent_axis(ax)
    ax.set_title("BYOM-LoRA: accuracy vs rank")
    return fig


def error_vs_rank(errors, ax=None):
    """Relative Frobenius error of the rank-q approximation (log axis), mean and spread over layers."""
    fig, ax = figure(ax)
    sns.lineplot(data=errors, x="rank", y="relative_error", hue="task", marker="o", errorbar=("pi", 100), ax=ax)
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("q: rank kept")
    ax.set_ylabel("‖ΔW − ΔW_q‖_F / ‖ΔW‖_F")
    ax.set_title("Approximation error of truncated LoRA updates")
    return fig


def accuracy_vs_num_tasks(study, ax=None):
    """Mean normalised accuracy of the merged tasks against the number of tasks merged."""
    fig, ax = figure(ax)
    sns.lineplot(data=study, x="k", y="normalized_accuracy", hue="method", marker="o", errorbar="sd", ax=ax)
    ax.set_xlabel("number of tasks merged")
    percent_axis(ax, "normalized accuracy (%)")
    ax.set_title("More tasks, more interference")
    return fig


def accuracy_vs_params(table, ax=None):
    """Each method's average accuracy against the extra parameters it stores per task."""
    fig, ax = figure(ax)
    data = table.reset_index()
    x = data["extra_params_per_task"].clip(lower=1)
    ax.scatter(x, data["average"], s=40)
    for xi, yi, label in zip(x, data["average"], data["method"]):
        ax.annotate(label, (xi, yi), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("extra parameters per task (log; 1 = none)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Accuracy vs storage")
    return fig


def pair_comparison(study, ax=None):
    """Similar vs dissimilar pairs: mean accuracy of each method at each m."""
    fig, ax = figure(ax)
    data = mean_by(study, ["pair", "method", "m_percent"])
    sns.lineplot(data=data, x="m_percent", y="accuracy", hue="pair", style="method", markers=True, ax=ax)
    ax.set_xlabel("m (%; 0 = task arithmetic alone)")
    percent_axis(ax)
    ax.set_title("Similar vs dissimilar tasks")
    return fig


def lambda_curve(scores: dict, chosen=None, ax=None):
    """Mean validation accuracy against λ, with the chosen λ marked."""
    fig, ax = figure(ax)
    lams = sorted(scores)
    ax.plot(lams, [scores[k] for k in lams], marker="o")
    if chosen is not None:
        ax.axvline(chosen, ls="--", color="0.5", label=f"chosen λ = {chosen:g}")
        ax.legend()
    ax.set_xlabel("λ")
    percent_axis(ax, "mean validation accuracy (%)")
    ax.set_title("Choosing λ on the validation split")
    return fig


def plot_byom_panel(accs: dict, reference: dict, merger: str, setting: str, label: str = "fine-tuned"):
    """Bar chart of per-task accuracy of `merger` at `setting` (e.g. "m = 5%") next to each task's reference."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(accs)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [100 * reference[n] for n in names], width=0.4, label=label, color="0.75")
    ax.bar([x + 0.2 for x in xs], [100 * accs[n] for n in names], width=0.4, label=f"{merger}, {setting}")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    mean = 100 * sum(accs.values()) / len(accs)
    ax.set_title(f"{merger}, {setting}: mean accuracy {mean:.1f}%", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
