"""Lesson 03's measurements (byom_lab.analysis.residuals) and figures (byom_lab.plots.residuals) on small state dicts."""
import matplotlib
import pandas as pd
import pytest
import torch

from byom_lab import merging, plots
from byom_lab.analysis import residuals as R
from byom_lab.merging import textbook as tb

matplotlib.use("Agg")

SHAPES = {"class_embedding": (16,), "conv1.weight": (8, 3, 2, 2), "ln_pre.weight": (8,),
          "transformer.resblocks.0.ln_1.weight": (8,), "transformer.resblocks.0.attn.in_proj_weight": (24, 8),
          "transformer.resblocks.0.attn.in_proj_bias": (24,), "transformer.resblocks.1.mlp.c_fc.weight": (32, 8),
          "transformer.resblocks.1.mlp.c_fc.bias": (32,), "ln_post.weight": (8,), "proj": (8, 4)}
TASKS = ["a", "b", "c"]


@pytest.fixture
def models():
    """θ0 and three fine-tuned models whose dicts list their tensors in reverse order (as files may)."""
    gen = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    fts = []
    for _ in TASKS:
        ft = {k: pre[k] + 0.1 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        fts.append(dict(reversed(list(ft.items()))))
    return pre, fts


def _res(models, lam=0.5):
    pre, fts = models
    merged = merging.task_arithmetic(pre, fts, lam=lam)
    return merged, R.flat_residuals(pre, fts, merged)


def test_flat_residuals_follow_the_anchor_key_order(models):
    pre, fts = models
    merged, res = _res(models)
    assert res["v"].shape == res["u"].shape == (3, sum(t.numel() for t in pre.values()))
    for t, ft in enumerate(fts):
        assert torch.allclose(res["v"][t], torch.cat([(ft[k] - pre[k]).reshape(-1) for k in pre]))
    d = torch.cat([(merged[k] - pre[k]).reshape(-1) for k in pre])
    assert torch.allclose(R.merged_direction(res), d, atol=1e-6)
    assert torch.allclose(res["u"], res["v"] - d, atol=1e-6)  # u_t = v_t − (θ* − θ0)


def test_residual_norms_obey_the_sum_identity(models):
    lam = 0.5
    _, res = _res(models, lam)
    norms = R.residual_norms(res, TASKS)
    assert list(norms["task"]) == TASKS
    assert norms["v_norm"].tolist() == pytest.approx(res["v"].norm(dim=1).tolist(), rel=1e-6)
    s_sq = float(res["v"].double().sum(0).square().sum())
    lhs = float((norms["u_norm"] ** 2).sum())
    rhs = float((norms["v_norm"] ** 2).sum()) + s_sq * (len(TASKS) * lam**2 - 2 * lam)
    assert lhs == pytest.approx(rhs, rel=1e-6)
    assert (norms["ratio"] == norms["u_norm"] / norms["v_norm"]).all()


def test_covered_is_lambda_for_orthogonal_task_vectors():
    pre = {"w": torch.zeros(6)}
    fts = [{"w": torch.tensor([1.0, 2, 0, 0, 0, 0])}, {"w": torch.tensor([0.0, 0, 3, 1, 0, 0])},
           {"w": torch.tensor([0.0, 0, 0, 0, 2, 2])}]
    lam = 0.3
    res = R.flat_residuals(pre, fts, merging.task_arithmetic(pre, fts, lam=lam))
    norms = R.residual_norms(res, TASKS)
    assert norms["covered"].tolist() == pytest.approx([lam] * 3)
    # u_t = (1 − λ) v_t − λ Σ_{s≠t} v_s: its cosine with v_t follows from the norms
    v, u = res["v"], res["u"]
    expected = ((1 - lam) * v.norm(dim=1) / u.norm(dim=1)).tolist()
    assert norms["cos_u_v"].tolist() == pytest.approx(expected, rel=1e-5)


def test_pruning_curves_agree_with_top_and_with_the_built_models(models):
    pre, fts = models
    _, res = _res(models)
    curves = R.pruning_curves(res, TASKS, [0.05, 0.3, 1.0])
    assert len(curves) == 2 * 3 * 3
    for name in ("v", "u"):
        for t in range(3):
            x = res[name][t]
            row = curves[(curves["residual"] == name) & (curves["task"] == TASKS[t]) & (curves["density"] == 0.3)].iloc[0]
            kept = tb.top(x, 0.3)
            assert row["kept"] == int((kept != 0).sum())
            assert row["energy_share"] == pytest.approx(float(kept.square().sum() / x.square().sum()), rel=1e-6)
            assert row["error"] == pytest.approx(float((x - kept).norm() / res["v"][t].norm()), rel=1e-5)
            assert row["threshold"] == pytest.approx(float(kept[kept != 0].abs().min()))
    full = curves[curves["density"] == 1.0]
    assert full["energy_share"].tolist() == pytest.approx([1.0] * 6)
    assert full["error"].tolist() == pytest.approx([0.0] * 6, abs=1e-6)
    assert full["along_v"].tolist() == pytest.approx([1.0] * 6)  # θ̂_t = θ_t
    v_rows = curves[curves["residual"] == "v"]
    assert (v_rows["along_v"] - v_rows["energy_share"]).abs().max() < 1e-9  # post-pruning: progress = energy


def test_along_v_matches_the_byom_models(models):
    pre, fts = models
    lam, density = 0.5, 0.2
    _, res = _res(models, lam)
    curves = R.pruning_curves(res, TASKS, [density])
    result = merging.byom_fft(pre, fts, density=density, lam=lam)
    for t in range(3):
        rebuilt = result.task_state_dict(t)
        step = torch.cat([(rebuilt[k] - pre[k]).reshape(-1) for k in pre]).double()
        v = res["v"][t].double()
        row = curves[(curves["residual"] == "u") & (curves["task"] == TASKS[t])].iloc[0]
        assert row["along_v"] == pytest.approx(float(step @ v / (v @ v)), rel=1e-5)


def test_magnitude_histogram_counts_every_entry_once(models):
    _, res = _res(models)
    hist = R.magnitude_histogram(res, bins=20)
    assert set(hist["residual"]) == {"v", "u"} and len(hist) == 40
    for name in ("v", "u"):
        assert hist.loc[hist["residual"] == name, "share"].sum() == pytest.approx(1.0, abs=1e-6)
        assert hist.loc[hist["residual"] == name, "magnitude"].is_monotonic_increasing


def test_layers_and_kinds_of_tensor_names():
    assert R.layer_of("transformer.resblocks.11.mlp.c_fc.weight") == "block 11"
    assert R.layer_of("proj") == R.layer_of("ln_post.bias") == "head"
    assert R.layer_of("conv1.weight") == R.layer_of("ln_pre.weight") == "embedding"
    assert R.tensor_kind("transformer.resblocks.0.ln_2.weight") == "LayerNorm gain"
    assert R.tensor_kind("ln_pre.bias") == "LayerNorm bias"
    assert R.tensor_kind("transformer.resblocks.3.attn.out_proj.bias") == "attention bias"
    assert R.tensor_kind("transformer.resblocks.3.mlp.c_proj.weight") == "MLP weight"
    assert R.tensor_kind("positional_embedding") == "embedding" and R.tensor_kind("proj") == "projection"


def test_kept_by_tensor_adds_up_to_the_result(models):
    pre, fts = models
    result = merging.post_pruning(pre, fts, density=0.1)
    kept = R.kept_by_tensor(result, TASKS, pre)
    assert len(kept) == len(TASKS) * len(pre)
    for t, name in enumerate(TASKS):
        mine = kept[kept["task"] == name]
        assert mine["kept"].sum() == result.task_params(t)
        assert mine["budget_share"].sum() == pytest.approx(1.0)
    row = kept[(kept["task"] == "a") & (kept["tensor"] == "proj")].iloc[0]
    assert row["kept_share"] == row["kept"] / 32 and row["kind"] == "projection" and row["layer"] == "head"


def test_agreement_by_kind_sees_identical_task_vectors():
    gen = torch.Generator().manual_seed(1)
    pre = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    same = {k: 0.1 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    fts = [{k: pre[k] + same[k] for k in pre} for _ in TASKS]
    res = R.flat_residuals(pre, fts, merging.task_arithmetic(pre, fts, lam=0.3))
    agreement = R.agreement_by_kind(res, pre)
    assert agreement["mean_cos"].tolist() == pytest.approx([1.0] * len(agreement), abs=1e-6)
    assert agreement["v_energy"].sum() == pytest.approx(1.0) and agreement["u_energy"].sum() == pytest.approx(1.0)
    assert agreement.set_index("kind")["entries"].sum() == sum(t.numel() for t in pre.values())


def test_storage_matches_the_result_and_breaks_even_where_the_formula_says(models):
    pre, fts = models
    n, T = sum(t.numel() for t in pre.values()), len(fts)
    result = merging.byom_fft(pre, fts, density=0.1, lam=0.3)
    store = R.storage(n, T, [0.1])
    assert store["bytes_per_task"].iloc[0] == result.nbytes() == 8 * result.num_params()
    assert store["total_bytes"].iloc[0] == 4 * n + T * store["bytes_per_task"].iloc[0]
    even = R.storage(10**6, 8, [7 / 16])
    assert even["share_of_full"].iloc[0] == pytest.approx(1.0)


def test_tie_check_counts_a_tie_at_the_threshold():
    pre = {"w": torch.zeros(10)}
    fts = [{"w": torch.tensor([5.0, 3, 3, 1, 0.5, 0.2, 0.1, 0.1, 0.05, 0.01])}]  # k = 2 at m = 20%: a tie at 3
    textbook = tb.post_pruning(pre, fts, density=0.2)
    fast = merging.post_pruning(pre, fts, density=0.2)
    check = R.tie_check(textbook, fast)
    assert check.loc[0, "extra_kept"] == 1 and check.loc[0, "differing"] == 1 and check.loc[0, "explained"]
    no_tie = [{"w": torch.tensor([5.0, 3, 2, 1, 0.5, 0.2, 0.1, 0.1, 0.05, 0.01])}]
    check = R.tie_check(tb.post_pruning(pre, no_tie, density=0.2), merging.post_pruning(pre, no_tie, density=0.2))
    assert check.loc[0, "differing"] == check.loc[0, "extra_kept"] == 0


def test_figures_draw_both_residuals(models):
    pre, fts = models
    _, res = _res(models)
    norms, curves = R.residual_norms(res, TASKS), R.pruning_curves(res, TASKS, [0.05, 0.2, 0.5])
    fig = plots.residual_sizes(norms, R.magnitude_histogram(res, bins=10))
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) >= 2 * len(TASKS) and len(fig.axes[1].lines) == 2
    fig = plots.energy_share(curves)
    assert len(fig.axes[0].lines) == 2 * len(TASKS) + 2 + 1  # one per task and residual, two means, share = m
    fig = plots.distance_and_progress(curves, norms)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylim() == (0, 100)
    kept = [R.kept_by_tensor(r, TASKS, pre).assign(residual=name) for name, r in
            (("u", merging.byom_fft(pre, fts, density=0.1, lam=0.5)), ("v", merging.post_pruning(pre, fts, density=0.1)))]
    fig = plots.kept_by_layer(pd.concat(kept))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["embedding", "block 0", "block 1", "head"]
    matplotlib.pyplot.close("all")
