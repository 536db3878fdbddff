"""Lesson 01's measurements and figures: task-vector norms and sums, accuracy along λ, pair interference."""
import matplotlib
import pandas as pd
import pytest
import torch

from byom_lab import merging, plots
from byom_lab.analysis import task_vectors as tv
from byom_lab.evaluation import accuracy
from byom_lab.selection import select_lambda

matplotlib.use("Agg")


def _vec(values):
    return {"a": torch.tensor(values[:2], dtype=torch.float32), "b": torch.tensor(values[2:], dtype=torch.float32)}


def test_norms_of_orthogonal_and_parallel_vectors():
    orthogonal = [_vec([1, 0, 0, 0]), _vec([0, 2, 0, 0]), _vec([0, 0, 0, 2])]
    assert tv.vector_norms(orthogonal, "xyz")["norm"].tolist() == pytest.approx([1, 2, 2])
    partial = tv.partial_sum_norms(orthogonal)
    assert partial["k"].tolist() == [1, 2, 3]
    assert partial["norm_of_sum"].tolist() == pytest.approx(partial["root_sum_of_squares"].tolist())
    assert partial["norm_of_sum"].iloc[-1] == pytest.approx(3.0) and partial["sum_of_norms"].iloc[-1] == 5
    parallel = tv.partial_sum_norms([_vec([1, 1, 0, 0])] * 4)
    assert parallel["norm_of_sum"].tolist() == pytest.approx(parallel["sum_of_norms"].tolist())
    assert parallel["root_sum_of_squares"].iloc[-1] == pytest.approx(2 * 2**0.5)  # √4 · √2


def test_norms_read_keys_in_one_order():
    a = {"x": torch.ones(2), "y": torch.zeros(2)}
    b = {"y": torch.zeros(2), "x": torch.ones(2)}  # same vector, other key order
    partial = tv.partial_sum_norms([a, b])
    assert partial["norm_of_sum"].iloc[-1] == pytest.approx(2 * 2**0.5)


def test_lambda_sweep_reproduces_select_lambda_per_task(reduced):
    suite, _ = reduced
    sweep = tv.lambda_sweep(suite, [0.2, 0.6])
    assert len(sweep) == 2 * len(suite.tasks) and set(sweep["lam"]) == {0.2, 0.6}
    _, scores = select_lambda(suite, grid=[0.2, 0.6])
    means = sweep.groupby("lam")["accuracy"].mean()
    assert means[0.2] == pytest.approx(scores[0.2]) and means[0.6] == pytest.approx(scores[0.6])
    with pytest.raises(ValueError, match="empty"):
        tv.lambda_sweep(suite, [])


def test_best_lambda_per_task_takes_the_smallest_on_ties():
    sweep = pd.DataFrame({"lam": [0.1, 0.5, 0.9] * 2, "task": ["b"] * 3 + ["a"] * 3,
                          "accuracy": [0.5, 0.8, 0.8, 0.9, 0.2, 0.1], "normalized_accuracy": [0.0] * 6})
    best = tv.best_lambda_per_task(sweep)
    assert best["task"].tolist() == ["b", "a"]  # the sweep's task order
    assert best["lam"].tolist() == [0.5, 0.1] and best["accuracy"].tolist() == [0.8, 0.9]


def test_pair_interference_matches_direct_evaluations(reduced):
    suite, _ = reduced
    table = tv.pair_interference(suite, lam=0.8, limit=30)
    assert len(table) == 2 and set(table["task"]) == set(suite.tasks)
    pre, fts = suite.pretrained, suite.finetuned
    alone = accuracy(suite, merging.task_arithmetic(pre, [fts[0]], lam=0.8), 0, "test", limit=30)
    together = accuracy(suite, merging.task_arithmetic(pre, fts, lam=0.8), 0, "test", limit=30)
    row = table.set_index("task").loc[suite.tasks[0]]
    assert row["other"] == suite.tasks[1]
    assert (row["alone"], row["together"]) == pytest.approx((alone, together))
    assert (table["change"] == table["together"] - table["alone"]).all()
    one = tv.pair_interference(suite, lam=0.8, limit=30, tasks=[suite.tasks[0]])
    assert one.empty and list(one.columns) == ["task", "other", "alone", "together", "change"]


def test_lesson_01_figures():
    vectors = [_vec([1, 0, 0, 0]), _vec([0, 2, 0, 0])]
    fig = plots.norms_and_sum(tv.vector_norms(vectors, ["p", "q"]), tv.partial_sum_norms(vectors))
    assert len(fig.axes) == 2 and len(fig.axes[1].get_lines()) == 3
    sweep = pd.DataFrame({"lam": [0.1, 0.5] * 2, "task": ["p", "p", "q", "q"], "accuracy": [0.2, 0.6, 0.7, 0.3],
                          "normalized_accuracy": [0.2, 0.6, 0.7, 0.3]})
    ax = plots.lambda_per_task(sweep, chosen=0.5).axes[0]
    assert "chosen λ = 0.5" in [t.get_text() for t in ax.get_legend().get_texts()]
    table = pd.DataFrame({"task": ["p", "q"], "other": ["q", "p"], "alone": [0.9, 0.8], "together": [0.7, 0.8],
                          "change": [-0.2, 0.0]})
    heat = plots.interference_heatmap(table).axes[0]
    assert sorted(t.get_text() for t in heat.texts) == ["-20", "0"]
    matplotlib.pyplot.close("all")
