"""Storage formulas, the Pareto front, budgets and interference vs k (analysis.storage), and their figures."""
import math

import matplotlib
import pandas as pd
import pytest
import torch

from byom_lab import merging, plots
from byom_lab.analysis import storage

matplotlib.use("Agg")


def test_storage_formulas_match_what_the_results_store(reduced):
    suite, _ = reduced
    pre, fts = suite.pretrained, suite.finetuned
    n = sum(v.numel() for v in pre.values())
    shapes = [(b.shape[0], a.shape[1]) for b, a in suite.lora[0].values()]
    formulas = storage.storage_formulas(n, len(fts), densities=(0.01, 0.1), lora_shapes=shapes, ranks=(1, 2))
    results = {"BYOM-FFT m=1%": merging.byom_fft(pre, fts, density=0.01, lam=0.5),
               "post-pruning m=10%": merging.post_pruning(pre, fts, density=0.1),
               "EMR-Merging": merging.emr(pre, fts),
               "BYOM-LoRA q=1": merging.byom_lora(pre, suite.lora, rank=1),
               "BYOM-LoRA q=2": merging.byom_lora(pre, suite.lora, rank=2)}
    measured = storage.measured_storage(results)
    for method in results:  # sparse results keep every entry tied at the threshold: a few more than m·N
        tolerance = 1e-4 * n if "m=" in method else 0
        assert 0 <= measured.loc[method, "params_per_task"] - formulas.loc[method, "params_per_task"] <= tolerance
        assert 0 <= measured.loc[method, "bytes_per_task"] - formulas.loc[method, "bytes_per_task"] <= 8 * tolerance
    sparse = results["BYOM-FFT m=1%"]
    assert sparse.nbytes(0) == 8 * sparse.num_params(0)  # an int32 index and a float32 value per kept entry
    assert formulas.loc["BYOM-FFT m=10%", "bytes_per_task"] == 8 * round(0.1 * n)
    assert formulas.loc["task arithmetic", "total_bytes"] == 4 * n
    assert formulas.loc["individual fine-tuned (full)", "total_bytes"] == 4 * n * len(fts)


def test_total_storage_adds_the_per_task_bytes_once_per_task():
    formulas = storage.storage_formulas(1000, 8, densities=(0.05,))
    totals = storage.total_storage(formulas, [1, 2, 3], methods=["BYOM-FFT m=5%", "task arithmetic"])
    byom = totals[totals.method == "BYOM-FFT m=5%"]["total_bytes"].tolist()
    assert byom == [4000 + 400, 4000 + 800, 4000 + 1200]
    assert set(totals[totals.method == "task arithmetic"]["total_bytes"]) == {4000}


def test_pareto_front_keeps_only_undominated_rows():
    table = pd.DataFrame({"extra_bytes_per_task": [0, 0, 10, 10, 100, 1000],
                          "average": [40, 70, 60, 80, 80, 95]}, index=list("abcdef"))
    front = storage.pareto_front(table)
    assert front.to_dict() == {"a": False, "b": True, "c": False, "d": True, "e": False, "f": True}


def test_best_under_budget_picks_the_most_accurate_row_that_fits():
    table = pd.DataFrame({"extra_bytes_per_task": [0, 10, 100], "average": [50, 70, 60]}, index=["x", "y", "z"])
    best = storage.best_under_budget(table, [0, 50, 1000])
    assert best["method"].tolist() == ["x", "y", "y"]
    assert storage.best_under_budget(table.iloc[1:], [5])["method"].tolist() == [None]


def test_top_energy_keeps_the_largest_entries():
    kept, left = storage.top_energy(torch.tensor([3.0, -4.0, 0.0, 0.0]), 0.25)
    assert kept == pytest.approx(16 / 25) and left == pytest.approx(3.0)


def test_interference_of_orthogonal_task_vectors_grows_like_sqrt_k():
    """Disjoint, equal-norm task vectors: ‖λ Σ_{s≠t} v_s‖ = λ√(k−1)‖v_t‖ exactly, whatever the key order."""
    T, width = 4, 5
    pre = {"a": torch.zeros(T * width), "b": torch.ones(3)}
    fts = []
    for t in range(T):
        a = torch.zeros(T * width)
        a[t * width:(t + 1) * width] = 2.0
        fts.append({"b": torch.ones(3), "a": a})  # another key order than θ0's
    lam = 0.4
    df = storage.interference_vs_k(pre, fts, ks=[2, 3, 4], orders=2, lam=lam, density=0.5)
    for k, rows in df.groupby("k"):
        assert rows["interference"].tolist() == pytest.approx([lam * math.sqrt(k - 1)] * len(rows))
        assert rows["residual"].tolist() == pytest.approx([math.sqrt((1 - lam) ** 2 + lam**2 * (k - 1))] * len(rows))
    assert (df["left_after_top"] <= df["residual"] + 1e-9).all()
    c = storage.sqrt_fit(df["k"], df["interference"])
    assert c == pytest.approx(lam)


def test_task_orders_are_seeded_permutations():
    a, b = storage.task_orders(8, 3, seed=0), storage.task_orders(8, 3, seed=0)
    assert a == b and all(sorted(p) == list(range(8)) for p in a) and a[0] != a[1]
    assert storage.task_orders(8, 3, seed=1) != a


def test_short_labels_read_like_a_legend():
    assert plots.short_label("post-pruning m=5%") == "post-prune 5%"
    assert plots.short_label("individual fine-tuned (LoRA)") == "individual (LoRA)"
    assert plots.short_label("BYOM-LoRA q=2") == "BYOM-LoRA q=2"
    assert plots.short_label("zero-shot (pretrained)") == "zero-shot"


def test_pareto_figure_labels_every_method_and_marks_zero_storage():
    table = pd.DataFrame({"extra_bytes_per_task": [0, 0, 2e4, 4e5, 2e7], "average": [40, 70, 60, 85, 95]},
                         index=["zero-shot (pretrained)", "task arithmetic", "EMR-Merging", "BYOM-FFT m=1%",
                                "individual fine-tuned (full)"])
    front = storage.pareto_front(table)
    fig = plots.pareto(table, front)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert sorted(labels) == sorted(plots.short_label(m) for m in table.index)
    assert ax.get_xticklabels()[0].get_text() == "0" and ax.get_xscale() == "log"
    bold = {t.get_text() for t in ax.texts if t.get_fontweight() == "bold"}
    assert bold == {"task arithmetic", "BYOM-FFT 1%", "individual (full)"}


def test_number_of_tasks_figures_draw_every_method():
    study = pd.DataFrame([{"order": o, "k": k, "method": m, "normalized_accuracy": 1 - 0.05 * k * (m == "task_arithmetic")}
                          for o in range(2) for k in (2, 4) for m in ("task_arithmetic", "byom_fft")])
    fig = plots.relative_vs_num_tasks(study)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"task arithmetic", "BYOM-FFT", "individual fine-tuned"} == set(legend)
    mech = pd.DataFrame([{"k": k, "interference": 0.5 * math.sqrt(k - 1), "residual": 1.0, "left_after_top": 0.5}
                         for k in (2, 4)])
    fig = plots.interference_growth(mech, study, fit=0.5, lam=0.5, density=0.1)
    assert len(fig.axes) == 2
    totals = pd.DataFrame({"method": ["a", "a", "b", "b"], "T": [1, 2, 1, 2], "total_bytes": [4e6, 8e6, 4e6, 4.5e6]})
    lines = plots.storage_vs_tasks(totals, mark=2).axes[0].get_lines()
    assert [line.get_label() for line in lines[:2]] == ["a", "b"] and list(lines[0].get_ydata()) == [4e6, 8e6]
    ta = fig.axes[1].get_lines()[0].get_ydata()
    assert list(ta) == pytest.approx([10.0, 20.0])  # drop = 100·(1 − normalized accuracy)
