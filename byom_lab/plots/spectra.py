"""Figures of LoRA spectra: normalised singular values, the truncation error's decay, the factored SVD's speed."""
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .common import figure


def singular_value_spectra(spectra, reference=None):
    """Left: σ_i/σ_1 of every task's LoRA update, one faint line per (task, matrix), the median bold.
    Right: the share of ‖ΔW‖_F² held by the top q, per matrix kind.

    `reference` optionally is a DataFrame (i, normalized) drawn dashed, e.g. `analysis.spectra.random_spectrum`.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    tasks = list(dict.fromkeys(spectra["task"]))
    colors = dict(zip(tasks, sns.color_palette("tab10", len(tasks))))
    for (task, _), group in spectra.groupby(["task", "layer"], sort=False):
        left.plot(group["i"], group["normalized"], color=colors[task], alpha=0.25, lw=0.8)
    median = spectra.groupby("i")["normalized"].median()
    left.plot(median.index, median.values, color="k", lw=2.5, marker="o", label="median over tasks and matrices")
    if reference is not None:
        left.plot(reference["i"], reference["normalized"], color="0.4", ls="--", lw=2, label="random factors, same shape")
    left.set_xlabel("i (singular value index)")
    left.set_ylabel("σ_i / σ_1")
    left.set_ylim(0, 1.05)
    left.set_title("Spectra of the LoRA updates ΔW_t = B_t A_t", fontsize=10)
    left.legend(fontsize=8)
    energy = spectra.groupby(["kind", "i"], as_index=False)["energy"].mean()
    sns.lineplot(data=energy, x="i", y="energy", hue="kind", marker="o", ax=right)
    right.set_xlabel("q (singular values kept)")
    right.set_ylabel("share of ‖ΔW‖²_F kept")
    right.set_ylim(0, 1.02)
    right.set_title("Energy kept by the top q (mean over tasks)", fontsize=10)
    right.legend(fontsize=8, title="matrix")
    fig.tight_layout()
    return fig


def lora_error_decay(errors, fit=None, ax=None):
    """Relative truncation error against q on a log y axis (an exponential is a straight line), with the fit drawn."""
    fig, ax = figure(ax)
    data = errors[errors["relative_error"] > 0]
    for kind, group in data.groupby("kind"):
        mean = np.exp(np.log(group["relative_error"]).groupby(group["rank"]).mean())
        ax.plot(mean.index, mean.values, marker="o", lw=1, alpha=0.8, label=kind)
    overall = np.exp(np.log(data["relative_error"]).groupby(data["rank"]).mean())
    ax.plot(overall.index, overall.values, color="k", marker="o", lw=2.5, label="all matrices (geometric mean)")
    if fit is not None:
        q = np.arange(1, int(errors["rank"].max()))
        ax.plot(q, np.exp(fit["log_intercept"]) * fit["per_rank_factor"] ** q, color="k", ls="--",
                label=f"fit C·ρ^q, ρ = {fit['per_rank_factor']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("q (rank kept)")
    ax.set_ylabel("‖ΔW − ΔW_q‖_F / ‖ΔW‖_F")
    top = int(errors["rank"].max())
    ax.annotate(f"q = r = {top}: error exactly 0\n(off the log scale)", xy=(0.98, 0.97), xycoords="axes fraction",
                ha="right", va="top", fontsize=8)
    ax.set_title("Truncation error against q (log scale)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def svd_speed(timings, ax=None):
    """Seconds of the dense SVD and of the factored SVD against the matrix size d_out·d_in (log–log)."""
    fig, ax = figure(ax)
    data = timings.assign(size=timings["d_out"] * timings["d_in"]).sort_values("size")
    ax.plot(data["size"], data["dense_seconds"], marker="o", ls="none", label="torch.linalg.svd(B @ A) (dense)")
    ax.plot(data["size"], data["factored_seconds"], marker="s", ls="none", label="factored_svd(B, A) (QR + r×r core)")
    for _, row in data.iterrows():
        ax.annotate(f"{row['d_out']}×{row['d_in']}", (row["size"], row["dense_seconds"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("d_out · d_in (entries of the dense update)")
    ax.set_ylabel("seconds (best of repeats)")
    ax.set_title("SVD of a rank-r update: dense vs from the factors", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def lora_accuracy_and_storage(sweep, storage, reference=None):
    """Left: mean accuracy against q (with the LoRA fine-tuned models as a line). Right: numbers stored per task against q."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for method, group in sweep.groupby("method"):
        mean = group.groupby("rank")["accuracy"].mean()
        left.plot(mean.index, 100 * mean.values, marker="o", label=method)
    for i, (label, value) in enumerate((reference or {}).items()):
        left.axhline(100 * value, ls="--", lw=1, color=f"C{i + 3}", label=label)
    left.set_xscale("log", base=2)
    left.set_xlabel("q (rank kept per matrix)")
    left.set_ylabel("mean test accuracy (%)")
    left.set_title("BYOM-LoRA: accuracy against q", fontsize=10)
    left.legend(fontsize=8)
    right.plot(storage["rank"], storage["byom_lora_params"], marker="o", label="BYOM-LoRA: Σ q(d_out + d_in + 1)")
    right.axhline(storage["lora_params"].iloc[0], ls="--", color="C1", label="LoRA factors B, A (rank r)")
    right.axhline(storage["full_model_params"].iloc[0], ls=":", color="C2", label="a full image tower")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("q (rank kept per matrix)")
    right.set_ylabel("numbers stored per task")
    right.set_title("Storage against q", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
