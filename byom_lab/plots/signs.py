"""Figures of sparsify × sign consensus × scale (TIES, DARE): energy kept, sign conflicts, agreement, λ, p, m, switches."""
import matplotlib.pyplot as plt
import seaborn as sns

from .common import figure, percent_axis


def _log_percent_axis(ax, values, label):
    """A log x axis ticked at `values` (percent), labelled plainly (0.5, 5, 50)."""
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(label)


def energy_curve(energy, reference=None, ax=None):
    """Share of each task vector's energy ‖v‖² kept by its top-m%, against m (log), with references.

    `energy` has columns task, m_percent, energy (`analysis.sparsify.energy_kept`); `reference`
    optionally maps a label to a DataFrame with m_percent and energy (e.g. Gaussian entries).
    """
    fig, ax = figure(ax)
    sns.lineplot(data=energy, x="m_percent", y="energy", hue="task", marker="o", ax=ax, lw=1, markersize=4)
    for i, (label, ref) in enumerate((reference or {}).items()):
        ax.plot(ref["m_percent"], ref["energy"], ls="--", color=f"{0.2 + 0.3 * i:.1f}", lw=2, label=label)
    ms = sorted(energy["m_percent"].unique())
    ax.plot(ms, [m / 100 for m in ms], ls=":", color="0.5", label="equal magnitudes (energy = m)")
    _log_percent_axis(ax, ms, "m: largest magnitudes kept (%)")
    percent_axis(ax, "energy ‖top(v_t, m)‖² / ‖v_t‖² (%)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("How much of a task vector its largest entries hold")
    return fig


def conflicts_by_layer(conflicts, axes=None):
    """Two panels per layer: entries whose kept contributions disagree in sign, and what the election discards.

    `conflicts` stacks `analysis.signs.sign_conflicts` frames for several densities (column density).
    Left: the share of active entries with conflicting signs, before the election (one bar per m)
    and after it (zero by construction). Right: the share of the kept magnitude Σ|v̂_t| whose sign
    loses the election.
    """
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    fig = axes[0].figure
    data = conflicts.assign(m=conflicts["density"].map(_m_label))
    order = list(dict.fromkeys(data["layer"]))
    sns.barplot(data=data, x="layer", y="conflict_fraction", hue="m", order=order, ax=axes[0])
    after = data.groupby("layer", sort=False)["conflict_fraction_after"].max().reindex(order)
    axes[0].plot(range(len(order)), after.values, "k_", ms=14, mew=2, label="after the election (any m)")
    percent_axis(axes[0], "entries with conflicting signs (%)")
    axes[0].set_title("Sign conflicts among the kept entries")
    sns.barplot(data=data, x="layer", y="discarded_mass_fraction", hue="m", order=order, ax=axes[1], legend=False)
    percent_axis(axes[1], "kept magnitude discarded (%)")
    axes[1].set_title("What TIES's election throws away")
    for ax in axes:
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].get_legend().remove()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _m_label(density: float) -> str:
    return "no trim (m = 100%)" if density >= 1 else f"m = {100 * density:g}%"


def agreement_histogram(counts, ax=None):
    """How many tasks agree at the entries of TIES's τ, by share of the summed magnitude, one colour per m.

    `counts` stacks `analysis.signs.agreement_counts` frames (column density).
    """
    fig, ax = figure(ax)
    data = counts.assign(m=counts["density"].map(_m_label))
    sns.barplot(data=data, x="count", y="sum_share", hue="m", ax=ax)
    ax.set_xlabel("|A_i|: tasks agreeing with the elected sign γ")
    percent_axis(ax, "share of Σ_t |v̂_t| kept (%)")
    ax.set_title("The divisor of TIES's mean, with and without trimming")
    ax.legend(fontsize=8)
    return fig


def switch_ladder(table, reference=None, ax=None):
    """Validation and test accuracy of merge settings as horizontal bars (columns setting, val_accuracy, accuracy)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.5))
    fig = ax.figure
    data = table.melt(id_vars="setting", value_vars=["val_accuracy", "accuracy"], var_name="split", value_name="acc")
    data["split"] = data["split"].map({"val_accuracy": "validation", "accuracy": "test"})
    sns.barplot(data=data, y="setting", x="acc", hue="split", orient="h", ax=ax)
    for i, (label, value) in enumerate((reference or {}).items()):
        ax.axvline(value, ls="--", lw=1, color=f"C{i + 2}", label=label)
    low, high = data["acc"].min(), data["acc"].max()
    ax.set_xlim(max(0.0, low - 0.04), min(1.0, high + 0.02))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{100 * v:.0f}"))
    ax.set_xlabel("mean accuracy (%), λ chosen on validation for each row")
    ax.set_ylabel("")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("One switch at a time")
    fig.tight_layout()
    return fig


def dare_error(errors, ax=None):
    """Relative error ‖mean of n draws − v‖ / ‖v‖ against n (log-log): rescaled draws vs dropped only vs theory."""
    fig, ax = figure(ax)
    styles = {"rescaled (DARE)": dict(marker="o", ms=8, lw=3, alpha=0.6), "dropped only": dict(marker="s")}
    for name, part in errors.groupby("estimator", sort=False):
        ax.plot(part["draws"], part["relative_error"], label=name, **styles.get(name, dict(ls="--", color="k", zorder=3)))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(errors["draws"].unique()))
    plain = plt.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_yticks([0.1, 0.2, 0.5, 1, 2, 3])
    ax.set_xlabel("n: independent DARE draws averaged")
    ax.set_ylabel("‖mean − v‖ / ‖v‖")
    ax.legend(fontsize=8)
    ax.set_title("DARE is unbiased: its average converges to v")
    return fig


def lambda_curves(curves: dict, chosen: dict | None = None, ax=None):
    """Mean validation accuracy against λ for several methods (label -> {λ: accuracy}), chosen λ marked."""
    fig, ax = figure(ax)
    for i, (label, scores) in enumerate(curves.items()):
        lams = sorted(scores)
        ax.plot(lams, [scores[k] for k in lams], marker="o", ms=4, color=f"C{i}", label=label)
        if chosen and label in chosen:
            ax.axvline(chosen[label], ls="--", lw=1, color=f"C{i}")
    ax.set_xlabel("λ")
    percent_axis(ax, "mean validation accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title("Each method's λ, chosen on validation (dashed)")
    return fig


def accuracy_sweep(sweep, x: str, xlabel: str, title: str, reference=None, log=False, ax=None):
    """Mean accuracy against one swept option (DARE's p, TIES's m), with reference accuracies as lines."""
    fig, ax = figure(ax)
    ax.plot(sweep[x], sweep["accuracy"], marker="o", color="C0", label="mean test accuracy")
    for i, (label, value) in enumerate((reference or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{i + 1}", label=label)
    if log:
        _log_percent_axis(ax, sweep[x], xlabel)
    else:
        ax.set_xlabel(xlabel)
    percent_axis(ax)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig
