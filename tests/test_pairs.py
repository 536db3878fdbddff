"""Pairs of tasks (analysis.pairs) and their figures (plots.pairs): geometry on synthetic vectors, λ curves on a reduced suite."""
import math
from types import SimpleNamespace

import matplotlib
import pandas as pd
import pytest
import torch

import byom_lab as bl
from byom_lab.analysis import pairs
from byom_lab.plots import pairs as ppl
from byom_lab.selection import select_lambda

matplotlib.use("Agg")


def _suite(v1, v2, name="pair"):
    """A suite-like pair: θ0 = 1 everywhere, θ_t = θ0 + v_t, split into a matrix and a bias."""
    v1, v2 = torch.as_tensor(v1, dtype=torch.float64), torch.as_tensor(v2, dtype=torch.float64)
    theta0 = {"transformer.resblocks.0.mlp.c_fc.weight": torch.ones(2, 2, dtype=torch.float64),
              "transformer.resblocks.0.mlp.c_fc.bias": torch.ones(2, dtype=torch.float64)}

    def model(v):
        return {"transformer.resblocks.0.mlp.c_fc.weight": 1 + v[:4].reshape(2, 2),
                "transformer.resblocks.0.mlp.c_fc.bias": 1 + v[4:]}

    return SimpleNamespace(name=name, tasks=["a", "b"], pretrained=theta0, finetuned=[model(v1), model(v2)])


def test_flat_task_vectors_is_theta_t_minus_theta0():
    suite = _suite([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, -1])
    v = pairs.flat_task_vectors(suite)
    assert v.shape == (2, 6) and v.dtype == torch.float64
    assert v[0].tolist() == [1, 2, 3, 4, 5, 6] and v[1].tolist() == [0, 0, 0, 0, 1, -1]


def test_geometry_of_aligned_and_orthogonal_vectors():
    aligned = pairs.geometry(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), ["a", "b"]).set_index("task")
    assert aligned.loc["a", "cosine"] == pytest.approx(1.0)
    assert aligned.loc["a", "reach_at_1"] == pytest.approx(3.0)  # 1 + cos·‖v_b‖/‖v_a‖ = 1 + 2
    assert aligned.loc["b", "reach_at_1"] == pytest.approx(1.5)
    assert aligned.loc["a", "sum_norm"] == pytest.approx(3.0)
    orthogonal = pairs.geometry(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), ["a", "b"]).set_index("task")
    assert orthogonal.loc["a", "cosine"] == pytest.approx(0.0)
    assert orthogonal["reach_at_1"].tolist() == pytest.approx([1.0, 1.0])  # orthogonal: each lands on its own mark
    assert orthogonal.loc["a", "sum_norm"] == pytest.approx(5.0)


def test_law_of_cosines_holds_for_the_sum():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    g = pairs.geometry(v, ["a", "b"]).set_index("task")
    n1, n2, c = g.loc["a", "norm"], g.loc["b", "norm"], g.loc["a", "cosine"]
    assert g.loc["a", "sum_norm"] ** 2 == pytest.approx(n1**2 + n2**2 + 2 * c * n1 * n2)
    assert g.loc["a", "reach_at_1"] == pytest.approx(1 + c * n2 / n1)


def test_overshoot_is_linear_in_lambda():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    df = pairs.overshoot(v, ["a", "b"], [0.5, 1.0, 2.0]).set_index(["task", "lam"])
    assert df.loc[("a", 1.0), "reach"] == pytest.approx(2.0)
    assert df.loc[("a", 0.5), "reach"] == pytest.approx(1.0)
    assert df.loc[("b", 2.0), "reach"] == pytest.approx(2 * 3 / 2)  # ⟨(2, 1), (1, 1)⟩ / 2 = 1.5, times λ = 2
    assert df.loc[("a", 1.0), "length_ratio"] == pytest.approx(math.sqrt(5))


def test_pair_tables_label_each_pair_and_layer_cosines_reads_matrices():
    suites = {"same": _suite([1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]), "apart": _suite([1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0])}
    geometry = pairs.pair_geometry(suites)
    assert geometry.set_index("pair")["cosine"].to_dict() == pytest.approx({"same": 1.0, "apart": 0.0})
    over = pairs.pair_overshoot(suites, lams=[1.0])
    assert len(over) == 4 and set(over["pair"]) == {"same", "apart"}
    layers = pairs.layer_cosines(suites["same"])
    assert layers["layer"].tolist() == ["transformer.resblocks.0.mlp.c_fc.weight"]  # biases are left out
    assert layers["cosine"].iloc[0] == pytest.approx(1.0) and layers["kind"].iloc[0] == "mlp.c_fc"
    three = SimpleNamespace(name="three", tasks=["a", "b", "c"], pretrained={}, finetuned=[])
    with pytest.raises(ValueError, match="pair"):
        pairs.layer_cosines(three)


def test_lambda_curves_follow_select_lambda(reduced):
    suite, _ = reduced
    grid = [0.5, 1.0]
    curves = pairs.lambda_curves({"reduced": suite}, grid=grid)
    best, scores = select_lambda(suite, "task_arithmetic", grid=grid)
    assert curves["lam"].tolist() == grid and curves["chosen"].sum() == 1
    assert curves.loc[curves["chosen"], "lam"].item() == best
    assert curves.set_index("lam")["val_accuracy"].to_dict() == pytest.approx(scores)
    assert (curves["val_normalized"] > 0).all()


def test_feature_shift_and_cross_accuracy_on_a_reduced_pair(reduced):
    suite, _ = reduced
    shift = pairs.feature_shift(suite, limit=8).set_index(["task", "model"])
    assert len(shift) == 2 * 3
    for task in suite.tasks:
        assert shift.loc[(task, "own"), "from_own"] == 0.0 and shift.loc[(task, "own"), "shift"] > 0
        assert 0 <= shift.loc[(task, "other"), "shift"] <= 2  # distances of unit vectors
    at_zero = pairs.feature_shift(suite, limit=8, lam=0.0).set_index(["task", "model"])
    assert at_zero.loc[(suite.tasks[0], "merged"), "shift"] == pytest.approx(0.0, abs=1e-6)  # λ = 0: θ0 itself
    assert at_zero.loc[(suite.tasks[0], "merged"), "from_own"] == pytest.approx(shift.loc[(suite.tasks[0], "own"), "shift"], rel=1e-5)
    both = pairs.pair_feature_shift({"r": suite}, limit=8)
    assert set(both["pair"]) == {"r"} and len(both) == 6
    cross = pairs.cross_accuracy({"r": suite}).set_index("task")
    other = bl.evaluate(suite, suite.finetuned[1], tasks=[suite.tasks[0]])["accuracy"].iloc[0]
    assert cross.loc[suite.tasks[0], "other_model"] == pytest.approx(other)
    zero = bl.evaluate(suite, suite.pretrained)["accuracy"].tolist()
    assert cross["zero_shot"].tolist() == pytest.approx(zero)
    assert cross["other_effect"].tolist() == pytest.approx((cross["other_model"] - cross["zero_shot"]).tolist())


def test_pair_figures_draw_their_data():
    suites = {"same": _suite([1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]), "apart": _suite([1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0])}
    fig = ppl.pair_vectors(pairs.pair_geometry(suites), pairs.pair_overshoot(suites, lams=[0.5, 1.0]))
    assert len(fig.axes[0].patches) == 2 * 3  # ‖v_1‖, ‖v_2‖, ‖v_1 + v_2‖ per pair
    assert len(fig.axes[1].lines) == 4 + 3  # reach per pair and task, the aligned reference 2λ, and the two guides
    curves = pd.DataFrame({"pair": ["p"] * 3, "lam": [0.5, 1.0, 1.5], "val_normalized": [0.8, 0.9, 0.85],
                           "val_accuracy": [0.7, 0.8, 0.75], "chosen": [False, True, False]})
    fig = ppl.pair_lambda_curves(curves)
    assert fig.axes[0].lines[0].get_ydata().tolist() == [0.8, 0.9, 0.85]
    shift = pd.DataFrame({"pair": ["p"] * 3, "task": ["a"] * 3, "model": ["own", "other", "merged"],
                          "shift": [0.5, 0.2, 0.6], "from_own": [0.0, 0.4, 0.3]})
    fig = ppl.pair_feature_shift(shift)
    assert [bar.get_height() for bar in fig.axes[0].patches] == pytest.approx([0.5, 0.2, 0.3])
    study = pd.DataFrame({"pair": ["p"] * 3, "method": ["task arithmetic", "BYOM-FFT", "BYOM-FFT"], "m_percent": [0.0, 1.0, 5.0],
                          "normalized_accuracy": [0.8, 0.85, 0.9]})
    fig = ppl.pair_byom_curves(study)
    lines = fig.axes[0].lines
    assert lines[0].get_ydata().tolist() == [0.85, 0.9] and list(lines[1].get_ydata()) == [0.8, 0.8]
    import matplotlib.pyplot as plt

    plt.close("all")
