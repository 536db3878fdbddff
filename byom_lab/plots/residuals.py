"""Figures of why merge-then-prune stores less: the residuals v_t = θ_t − θ0 and u_t = θ_t − θ*, side by side.

Each function takes a DataFrame from `byom_lab.analysis.residuals` and returns a Figure. Colours
match `accuracy_vs_m`: BYOM-FFT (u) is C0, post-pruning (v) is C1.
"""
import matplotlib.pyplot as plt
import seaborn as sns

from ..analysis.anatomy import layer_order

RESIDUAL_LABELS = {"u": "BYOM-FFT: u_t = θ_t − θ*", "v": "post-pruning: v_t = θ_t − θ0"}
RESIDUAL_COLORS = {"u": "C0", "v": "C1"}


def _labelled(df):
    """`df` with a readable `residual` column, in the order u, v."""
    out = df[df["residual"].isin(list(RESIDUAL_LABELS))].copy()
    out["residual"] = out["residual"].map(RESIDUAL_LABELS)
    return out


def _palette():
    return {RESIDUAL_LABELS[k]: c for k, c in RESIDUAL_COLORS.items()}


def _m_axis(ax, values):
    """Log x axis of m (%), ticks at the measured values."""
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("m: entries kept per task (%)")


def residual_sizes(norms, histogram):
    """Left: ‖v_t‖ and ‖u_t‖ per task. Right: the distribution of |v_t| and |u_t| over all entries."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    long = norms.melt(id_vars="task", value_vars=["u_norm", "v_norm"], var_name="residual", value_name="norm")
    long["residual"] = long["residual"].str[0]
    sns.barplot(data=_labelled(long), x="task", y="norm", hue="residual", palette=_palette(), ax=left)
    left.set_xticks(left.get_xticks(), left.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    left.set_xlabel("")
    left.set_ylabel("L2 norm")
    left.set_title("Norm of what each method prunes", fontsize=10)
    left.set_ylim(0, 1.3 * long["norm"].max())
    left.legend(fontsize=7, loc="upper center", ncol=2)
    hist = _labelled(histogram)
    sns.lineplot(data=hist, x="magnitude", y="share", hue="residual", palette=_palette(), ax=right, legend=False)
    right.set_xscale("log")
    seen = hist.loc[hist["share"] > 1e-3 * hist["share"].max(), "magnitude"]  # leave out the empty tails
    right.set_xlim(seen.min() / 2, seen.max() * 2)
    right.set_xlabel("|entry| (all tasks, all entries)")
    right.set_ylabel("share of entries")
    right.set_title("Distribution of magnitudes", fontsize=10)
    fig.tight_layout()
    return fig


def energy_share(curves, ax=None):
    """‖top(x, m)‖² / ‖x‖² against m for u_t and v_t: one thin line per task, the mean bold."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    fig = ax.figure
    data = _labelled(curves)
    palette = _palette()
    for (label, _), part in data.groupby(["residual", "task"], sort=False):
        ax.plot(part["m_percent"], 100 * part["energy_share"], color=palette[label], lw=0.6, alpha=0.35)
    means = data.groupby(["residual", "m_percent"], as_index=False, sort=False)["energy_share"].mean()
    for label, part in means.groupby("residual", sort=False):
        ax.plot(part["m_percent"], 100 * part["energy_share"], color=palette[label], lw=2, marker="o", ms=4,
                label=f"{label} (mean)")
    ms = sorted(data["m_percent"].unique())
    ax.plot(ms, ms, ls=":", color="0.5", label="equal entries (share = m)")
    _m_axis(ax, ms)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("energy kept: ‖top(x, m)‖² / ‖x‖² (%)")
    ax.set_title("How much of the residual its top-m% holds", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def distance_and_progress(curves, norms):
    """Left: ‖θ_t − θ̂_t‖ / ‖v_t‖ against m. Right: how far along v_t the rebuilt θ̂_t has come, with θ* alone marked."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    data = _labelled(curves)
    kw = dict(x="m_percent", hue="residual", palette=_palette(), marker="o", errorbar=("pi", 100))
    sns.lineplot(data=data, y="error", ax=left, legend=False, **kw)
    left.axhline(1, ls=":", color="0.5")
    left.annotate("θ0 alone", (data["m_percent"].min(), 1), xytext=(0, 3), textcoords="offset points", fontsize=7)
    left.set_ylabel("‖θ_t − θ̂_t‖ / ‖v_t‖")
    left.set_title("Distance from θ_t (lower = closer)", fontsize=10)
    data = data.assign(along_v=100 * data["along_v"])
    sns.lineplot(data=data, y="along_v", ax=right, **kw)
    covered = 100 * norms["covered"].mean()
    right.axhline(covered, ls="--", color=RESIDUAL_COLORS["u"], lw=1)
    right.annotate("θ* alone (m = 0)", (data["m_percent"].min(), covered), xytext=(0, -10), textcoords="offset points",
                   fontsize=7)
    right.set_ylabel("⟨θ̂_t − θ0, v_t⟩ / ‖v_t‖² (%)")
    right.set_ylim(0, 100)
    right.set_title("Progress along the task's own vector (higher = better)", fontsize=10)
    right.legend(fontsize=7, loc="center right")
    for ax in (left, right):
        _m_axis(ax, data["m_percent"])
    fig.tight_layout()
    return fig


def kept_by_layer(kept):
    """Share of each layer's (left) and each kind of tensor's (right) entries kept, u_t against v_t, over all tasks.

    `kept`: `analysis.residuals.kept_by_tensor` frames of both methods, concatenated with a
    `residual` column ("u" for BYOM-FFT, "v" for post-pruning).
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [1, 1.2]})
    data = _labelled(kept)
    for ax, by in ((left, "layer"), (right, "kind")):
        sums = data.groupby(["residual", by], as_index=False, sort=False)[["kept", "numel"]].sum()
        sums["kept (%)"] = 100 * sums["kept"] / sums["numel"]
        order = layer_order(sums[by]) if by == "layer" else list(dict.fromkeys(sums[by]))
        sns.barplot(data=sums, x=by, y="kept (%)", hue="residual", palette=_palette(), order=order, ax=ax,
                    legend=ax is right)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks(ax.get_xticks(), ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("")
    m = 100 * data["kept"].sum() / data["numel"].sum()  # both methods keep the same count: m
    left.axhline(m, ls=":", color="0.5")
    right.axhline(m, ls=":", color="0.5")
    left.set_ylabel("entries kept (%, log)")
    right.set_ylabel("")
    left.set_title("By layer", fontsize=10)
    right.set_title("By kind of tensor", fontsize=10)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig
