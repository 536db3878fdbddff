"""Measurements and figures of lesson 02 (TIES and DARE): sign conflicts, agreement, energy, DARE draws, sweeps."""
import matplotlib
import pandas as pd
import pytest
import torch

import byom_lab as bl
from byom_lab import merging, plots
from byom_lab.analysis import signs, sparsify
from byom_lab.merging import textbook as tb
from byom_lab.selection import select_lambda

matplotlib.use("Agg")


def _toy():
    """θ0 = 0 and three tasks on two tensors, with hand-countable signs."""
    pre = {"embed": torch.zeros(3), "blocks.0.w": torch.zeros(4)}
    ft = [
        {"embed": torch.tensor([1.0, 2.0, 0.0]), "blocks.0.w": torch.tensor([1.0, -1.0, 0.0, 3.0])},
        {"embed": torch.tensor([-1.0, 3.0, 0.0]), "blocks.0.w": torch.tensor([2.0, 0.0, 0.0, -4.0])},
        {"embed": torch.tensor([-2.0, 1.0, 0.0]), "blocks.0.w": torch.tensor([0.0, 0.0, 0.0, 0.5])},
    ]
    return pre, ft


def _random(num_tasks=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (6, 5), "layers.0.w": (40,), "layers.1.w": (8, 8), "ln_post.bias": (7,)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ft = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, ft


def test_layer_names_split_inputs_blocks_and_outputs():
    keys = ["conv1.weight", "transformer.resblocks.0.attn.w", "transformer.resblocks.11.mlp.b", "ln_post.bias"]
    assert signs.layer_names(keys) == {"conv1.weight": "input", "transformer.resblocks.0.attn.w": "block 0",
                                       "transformer.resblocks.11.mlp.b": "block 11", "ln_post.bias": "output"}


def test_sign_conflicts_count_a_hand_made_example():
    pre, ft = _toy()
    df = signs.sign_conflicts(pre, ft).set_index("layer")
    embed, block = df.loc["input"], df.loc["block 0"]
    # embed: entry 0 has signs (+, −, −): conflict, γ = −1 (sum −2) discards task 0's +1; entry 1 agrees; entry 2 is 0
    assert (embed["active"], embed["conflicting"], embed["contributions"], embed["discarded"]) == (2, 1, 6, 1)
    assert embed["discarded_mass_fraction"] == pytest.approx(1 / 10)
    # block: entry 0 (+, +), entry 1 (−) alone, entry 3 (+3, −4, +0.5): sum −0.5, γ = −1 discards 3 and 0.5
    assert (block["active"], block["conflicting"], block["discarded"]) == (3, 1, 2)
    assert block["conflict_fraction"] == pytest.approx(1 / 3)
    assert (df["conflicting_after"] == 0).all() and (df["conflict_fraction_after"] == 0).all()
    totals = signs.conflict_totals(df.reset_index())
    assert totals["conflict_fraction"] == pytest.approx(2 / 5) and totals["discarded_fraction"] == pytest.approx(3 / 12)


def test_election_matches_the_textbook_ties():
    pre, ft = _random()
    for density in (0.3, 1.0):
        stacks = dict(signs.trimmed_stacks(pre, ft, density))
        expected = tb.flatten(tb.ties(pre, ft, density=density, lam=1.0)) - tb.flatten(pre)
        tau = []
        for key in pre:
            _, agree = signs.elected_agreement(stacks[key])
            tau.append((stacks[key] * agree).sum(0) / agree.sum(0).clamp_min(1))
        assert torch.allclose(torch.cat(tau), expected, atol=1e-6)


def test_trimming_lowers_conflicts_and_agreement_counts_add_up():
    pre, ft = _random(num_tasks=6)
    full = signs.conflict_totals(signs.sign_conflicts(pre, ft, density=1.0))
    trimmed = signs.conflict_totals(signs.sign_conflicts(pre, ft, density=0.2))
    assert trimmed["conflict_fraction"] < full["conflict_fraction"]
    assert full["conflict_fraction_after"] == trimmed["conflict_fraction_after"] == 0
    counts = signs.agreement_counts(pre, ft, density=0.2)
    assert counts["count"].tolist() == list(range(1, 7))
    tau = tb.flatten(tb.ties(pre, ft, density=0.2, lam=1.0)) - tb.flatten(pre)
    assert counts["entries"].sum() == int((tau != 0).sum())
    assert counts["share"].sum() == pytest.approx(1) and counts["sum_share"].sum() == pytest.approx(1)


def test_agreement_counts_of_the_hand_made_example():
    pre, ft = _toy()
    counts = signs.agreement_counts(pre, ft, density=1.0)
    indexed = counts.set_index("count")
    # agreeing tasks per entry: embed (2, 3, 0), block (2, 1, 0, 1); |Σ agreeing| = embed (3, 6), block (3, 1, 4)
    assert indexed["entries"].tolist() == [2, 2, 1] and (counts["density"] == 1.0).all()
    assert indexed.loc[3, "sum_share"] == pytest.approx(6 / 17)
    spread = signs.divisor_spread(counts)
    weights = pd.Series({1: 5 / 17, 2: 6 / 17, 3: 6 / 17})  # magnitude shares of counts 1, 2, 3
    assert spread["mean_count"] == pytest.approx((weights * weights.index).sum())
    inv = 1 / weights.index.to_series()
    mean_inv = (weights * inv).sum()
    assert spread["weight_cv"] == pytest.approx(((weights * (inv - mean_inv) ** 2).sum()) ** 0.5 / mean_inv)


def test_divisor_spread_is_zero_for_a_uniform_divisor():
    counts = pd.DataFrame({"count": [1, 2, 3], "sum_share": [0.0, 1.0, 0.0]})
    spread = signs.divisor_spread(counts)
    assert spread["mean_count"] == 2 and spread["weight_cv"] == 0


def test_energy_kept_and_the_gaussian_reference():
    v = [{"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0, 0.0])}]
    df = sparsify.energy_kept(v, [0.25, 0.5, 1.0], names=["toy"])
    assert df["energy"].tolist() == pytest.approx([16 / 25, 1.0, 1.0])
    assert df["task"].tolist() == ["toy"] * 3 and df["m_percent"].tolist() == [25, 50, 100]
    g = torch.Generator().manual_seed(0)
    noise = [{"x": torch.randn(200_000, generator=g)}]
    measured = sparsify.energy_kept(noise, [0.05, 0.2, 0.5])["energy"]
    assert measured.tolist() == pytest.approx(sparsify.gaussian_energy([0.05, 0.2, 0.5])["energy"].tolist(), abs=0.01)
    with pytest.raises(ValueError, match="empty"):
        sparsify.energy_kept(v, [])


def test_differing_entries_counts_only_real_differences():
    a = {"x": torch.tensor([1.0, 2.0, 3.0]), "y": torch.zeros(2)}
    b = {"x": torch.tensor([1.0, 2.5, 3.0 + 1e-8]), "y": torch.tensor([0.0, -1.0])}
    assert sparsify.differing_entries(a, b) == 2 and sparsify.differing_entries(a, a) == 0


def test_update_norm():
    pre = {"a": torch.zeros(2), "b": torch.ones(1)}
    assert sparsify.update_norm(pre, {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([5.0])}) == pytest.approx(5)


def test_dare_draws_average_to_v_only_when_rescaled():
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.zeros(20_000)}
    ft = {"w": torch.randn(20_000, generator=g)}
    df = sparsify.dare_mean_error(pre, ft, drop=0.8, draws=(1, 16, 64))
    err = df.pivot(index="draws", columns="estimator", values="relative_error")
    rescaled, predicted = err["rescaled (DARE)"], err[[c for c in err if c.startswith("predicted")][0]]
    assert (rescaled / predicted).between(0.95, 1.05).all()  # √(p/((1−p)n)): unbiased, variance p/(1−p)·v²
    assert rescaled.is_monotonic_decreasing
    assert err.loc[64, "dropped only"] == pytest.approx(0.8, abs=0.02)  # the mean tends to (1 − p)·v
    with pytest.raises(ValueError, match="drop"):
        sparsify.dare_mean_error(pre, ft, drop=0.0)


def test_sweeps_on_a_reduced_suite(reduced):
    suite, _ = reduced
    ta = merging.task_arithmetic(suite.pretrained, suite.finetuned, lam=0.4)
    drops = sparsify.drop_sweep(suite, [0.0, 0.5], lam=0.4, split="val")
    assert drops["drop"].tolist() == [0.0, 0.5]
    assert drops["accuracy"].iloc[0] == pytest.approx(bl.evaluate(suite, ta, "val")["accuracy"].mean())
    grid = [0.5, 1.0]
    dens = sparsify.density_sweep(suite, [0.2], grid=grid, split="val")
    lam, scores = select_lambda(suite, "ties", grid=grid, density=0.2)
    assert dens["lam"].iloc[0] == lam and dens["val_accuracy"].iloc[0] == scores[lam]
    assert dens["accuracy"].iloc[0] == pytest.approx(scores[lam])  # scored on the same split here
    with pytest.raises(ValueError, match="empty"):
        sparsify.drop_sweep(suite, [], lam=0.4)


def test_figures_draw_what_they_say():
    pre, ft = _random()
    vectors = merging.task_vectors(pre, ft)
    energy = sparsify.energy_kept(vectors, [0.1, 0.5], names=["a", "b", "c", "d"])
    fig = plots.energy_curve(energy, reference={"Gaussian": sparsify.gaussian_energy([0.1, 0.5])})
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].lines) >= 6
    conflicts = pd.concat([signs.sign_conflicts(pre, ft, density=d) for d in (1.0, 0.2)])
    fig = plots.conflicts_by_layer(conflicts)
    assert len(fig.axes) == 2 and {t.get_text() for t in fig.axes[0].get_xticklabels()} >= {"input", "block 0"}
    counts = pd.concat([signs.agreement_counts(pre, ft, density=d) for d in (1.0, 0.2)])
    fig = plots.agreement_histogram(counts)
    assert fig.axes[0].get_xlabel().startswith("|A_i|")
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"no trim (m = 100%)", "m = 20%"}
    ladder = pd.DataFrame({"setting": ["task arithmetic", "TIES"], "val_accuracy": [0.7, 0.68], "accuracy": [0.71, 0.69]})
    fig = plots.switch_ladder(ladder, reference={"task arithmetic": 0.71})
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["task arithmetic", "TIES"]
    assert fig.axes[0].get_xlim()[0] == pytest.approx(0.64)
    fig = plots.dare_error(sparsify.dare_mean_error(pre, ft[0], drop=0.5, draws=(1, 4)))
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 3
    fig = plots.lambda_curves({"TA": {0.5: 0.6, 1.0: 0.7}, "TIES": {1.0: 0.6, 2.0: 0.65}}, {"TA": 1.0, "TIES": 2.0})
    assert len(fig.axes[0].lines) == 4
    sweep = pd.DataFrame({"drop": [0.0, 0.5], "accuracy": [0.7, 0.6]})
    fig = plots.accuracy_sweep(sweep, "drop", "p", "DARE", reference={"task arithmetic": 0.7})
    assert fig.axes[0].get_xlabel() == "p" and len(fig.axes[0].lines) == 2


def test_own_coefficients_of_task_arithmetic_and_ties():
    pre = {"a": torch.zeros(2), "b": torch.zeros(1)}
    ft = [{"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}, {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0])}]
    ta = sparsify.own_coefficients(pre, ft, merging.task_arithmetic(pre, ft, lam=0.5), names=["x", "y"])
    assert ta.index.tolist() == ["x", "y"] and ta.tolist() == pytest.approx([0.5, 0.5])  # orthogonal: c_t = λ
    pre, ft = _random()
    one = sparsify.own_coefficients(pre, ft, merging.ties(pre, ft, density=0.2, lam=1.0))
    two = sparsify.own_coefficients(pre, ft, merging.ties(pre, ft, density=0.2, lam=2.0))
    assert two.tolist() == pytest.approx((2 * one).tolist(), rel=1e-4)  # linear in λ
    assert (one < sparsify.own_coefficients(pre, ft, merging.task_arithmetic(pre, ft, lam=1.0))).all()
