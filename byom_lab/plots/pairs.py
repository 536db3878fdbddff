"""Figures of merging a pair of tasks: task-vector lengths and alignment, reach against λ, λ curves, feature shifts, BYOM-FFT."""
import matplotlib.pyplot as plt
import numpy as np

from .common import figure, percent_axis


def pair_vectors(geometry, overshoot):
    """Left: ‖v_1‖, ‖v_2‖ and ‖v_1 + v_2‖ per pair, titled with cos(v_1, v_2).
    Right: reach_t(λ) = λ⟨v_1 + v_2, v_t⟩/‖v_t‖² against λ per pair and task; 1 = as far as task t's fine-tuning went.

    `geometry` from `analysis.pairs.pair_geometry`, `overshoot` from `analysis.pairs.pair_overshoot`.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    pairs = list(dict.fromkeys(geometry["pair"]))
    width = 0.25
    for p, pair in enumerate(pairs):
        rows = geometry[geometry["pair"] == pair]
        values = [*rows["norm"], rows["sum_norm"].iloc[0]]
        labels = [*rows["task"], "v₁ + v₂"]
        xs = p + width * (np.arange(len(values)) - (len(values) - 1) / 2)
        bars = left.bar(xs, values, width=width * 0.9, color=[f"C{p}"] * (len(values) - 1) + ["0.3"])
        for bar, label in zip(bars, labels):
            left.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                          fontsize=7, rotation=0)
    cosines = [geometry[geometry["pair"] == pair]["cosine"].iloc[0] for pair in pairs]
    left.set_xticks(range(len(pairs)), [f"{pair}\ncos(v₁, v₂) = {c:.3f}" for pair, c in zip(pairs, cosines)], fontsize=8)
    left.set_ylim(0, 1.12 * geometry["sum_norm"].max())
    left.set_ylabel("Euclidean norm")
    left.set_title("Task vectors and their sum", fontsize=10)
    for p, pair in enumerate(pairs):
        for s, (task, rows) in enumerate(overshoot[overshoot["pair"] == pair].groupby("task", sort=False)):
            right.plot(rows["lam"], rows["reach"], color=f"C{p}", ls=["-", "--"][s % 2], label=f"{pair}: {task}")
    lams = sorted(overshoot["lam"].unique())
    right.plot(lams, [2 * lam for lam in lams], color="0.5", ls=":", lw=2, label="if aligned (cos = 1, equal norms): 2λ")
    right.axhline(1, color="k", lw=1)
    right.axvline(1, color="0.6", lw=1, ls=":")
    right.set_xlabel("λ")
    right.set_ylabel("reach along v_t (1 = θ_t's own step)")
    right.set_title("How far λ(v₁ + v₂) goes along each v_t", fontsize=10)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def pair_lambda_curves(curves, ax=None):
    """Mean normalized validation accuracy of task arithmetic against λ, per pair; the chosen λ is ringed.

    `curves` from `analysis.pairs.lambda_curves`.
    """
    fig, ax = figure(ax)
    for p, (pair, rows) in enumerate(curves.groupby("pair", sort=False)):
        rows = rows.sort_values("lam")
        ax.plot(rows["lam"], rows["val_normalized"], marker="o", ms=3, color=f"C{p}", label=pair)
        chosen = rows[rows["chosen"]]
        ax.scatter(chosen["lam"], chosen["val_normalized"], s=120, facecolors="none", edgecolors=f"C{p}", lw=2,
                   label=f"{pair}: chosen λ = {chosen['lam'].iloc[0]:g}")
    ax.axvline(1, color="0.6", lw=1, ls=":")
    ax.set_xlabel("λ")
    percent_axis(ax, "mean normalized val accuracy (%)")
    ax.set_title("Task arithmetic on each pair: choosing λ", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def pair_feature_shift(shift, ax=None):
    """Per pair and task: how far the task's own vector, the other task's vector, and the merge move its image features.

    `shift` from `analysis.pairs.pair_feature_shift`: bars of `shift` for "own" and "other", and of `from_own`
    for "merged" (how far the merged model's features sit from the task's own fine-tuned model's).
    """
    fig, ax = figure(ax)
    if ax.figure.get_size_inches()[0] < 8:
        fig.set_size_inches(10, 3.5)
    groups = list(dict.fromkeys(zip(shift["pair"], shift["task"])))
    bars = (("own", "shift", "own vector v_t: ‖f(θ_t) − f(θ0)‖"), ("other", "shift", "other vector v_s: ‖f(θ0 + v_s) − f(θ0)‖"),
            ("merged", "from_own", "merged θ0 + λ(v_1 + v_2) vs own: ‖f(θ*) − f(θ_t)‖"))
    width = 0.27
    for b, (model, column, label) in enumerate(bars):
        values = [shift[(shift["pair"] == p) & (shift["task"] == t) & (shift["model"] == model)][column].iloc[0]
                  for p, t in groups]
        ax.bar(np.arange(len(groups)) + (b - 1) * width, values, width=width * 0.95, label=label, color=f"C{b}")
    ax.set_xticks(range(len(groups)), [f"{p}\n{t}" for p, t in groups], fontsize=8)
    ax.set_ylabel("mean feature distance")
    ax.set_ylim(0, 1.4 * max(bar.get_height() for bar in ax.patches))
    ax.set_title("How far each update moves a task's image features (its own images)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    return fig


def pair_byom_curves(study, ax=None):
    """Normalized test accuracy of BYOM-FFT against m for each pair, with task arithmetic alone as a dashed line.

    `study` from `studies.pair_study` (method "task arithmetic" at m_percent 0, "BYOM-FFT" at each m).
    """
    fig, ax = figure(ax)
    data = study.groupby(["pair", "method", "m_percent"], as_index=False, sort=False)["normalized_accuracy"].mean()
    for p, pair in enumerate(dict.fromkeys(data["pair"])):
        rows = data[data["pair"] == pair]
        byom = rows[rows["method"] == "BYOM-FFT"].sort_values("m_percent")
        ax.plot(byom["m_percent"], byom["normalized_accuracy"], marker="o", color=f"C{p}", label=f"{pair}: BYOM-FFT")
        ta = rows[rows["method"] == "task arithmetic"]["normalized_accuracy"]
        if len(ta):
            ax.axhline(ta.iloc[0], color=f"C{p}", ls="--", lw=1, label=f"{pair}: task arithmetic alone")
    ax.set_xlabel("m: entries of u_t kept per task (%)")
    percent_axis(ax, "mean normalized test accuracy (%)")
    ax.set_title("BYOM-FFT on each pair", fontsize=10)
    ax.legend(fontsize=8)
    return fig
