"""Evaluation, λ selection, studies, plots and widgets on a reduced tiny suite."""
import matplotlib
import pytest
import torch

import byom_lab as bl
from byom_lab import merging, plots, studies
from byom_lab.selection import select_lambda
from byom_lab.table import headline_table
from byom_lab.precomputed import FastByom, FastLora, byom_accuracies
from byom_lab.widgets import ByomPanel, LoraPanel

matplotlib.use("Agg")


def test_evaluate_reproduces_a_hand_computed_accuracy(reduced):
    suite, _ = reduced
    x, y = suite.data["textures"]["test"]
    with torch.no_grad():
        suite.visual.load_state_dict(suite.finetuned[1], strict=False)
        feats = torch.nn.functional.normalize(suite.visual(suite.normalize(x)), dim=-1)
        suite.visual.load_state_dict(suite.pretrained, strict=False)
    expected = float(((feats @ suite.heads[1].T).argmax(1) == y).float().mean())
    df = bl.evaluate(suite, suite.finetuned, tasks=["textures"])
    assert df["accuracy"].iloc[0] == pytest.approx(expected, abs=1e-6)
    assert df["normalized_accuracy"].iloc[0] == 1.0


def test_evaluate_accepts_results_and_lists(reduced):
    suite, _ = reduced
    result = merging.post_pruning(suite.pretrained, suite.finetuned, density=1.0)
    assert bl.evaluate(suite, result)["normalized_accuracy"].tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(TypeError, match="state dict"):
        bl.evaluate(suite, 3)


def test_lambda_selection_never_reads_the_test_split(reduced, monkeypatch):
    suite, _ = reduced
    seen = []
    original = type(suite).inputs

    def spy(self, task, split):
        seen.append(split)
        return original(self, task, split)

    monkeypatch.setattr(type(suite), "inputs", spy)
    suite._inputs.clear()
    lam, scores = select_lambda(suite, grid=[0.2, 0.6])
    assert seen and set(seen) == {"val"}
    assert lam in (0.2, 0.6) and scores[lam] == max(scores.values())
    with pytest.raises(ValueError, match="empty"):
        select_lambda(suite, grid=[])


def test_pruning_sweep_and_plot(reduced):
    suite, _ = reduced
    sweep = studies.pruning_sweep(suite, densities=[0.05, 0.5], lam=0.3)
    assert set(sweep["method"]) == {"BYOM-FFT", "post-pruning"}
    assert len(sweep) == 2 * 2 * len(suite.tasks)
    again = studies.pruning_sweep(suite, densities=[0.05, 0.5], lam=0.3)  # from the cache
    assert again["accuracy"].tolist() == pytest.approx(sweep["accuracy"].tolist())
    fig = plots.accuracy_vs_m(sweep, reference={"individual": 0.9})
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("m") and ax.get_xscale() == "log"
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"BYOM-FFT", "post-pruning", "individual"}
    with pytest.raises(ValueError, match="empty sweep"):
        studies.pruning_sweep(suite, densities=[])


def test_lora_studies_and_plots(reduced):
    suite, _ = reduced
    errors = studies.lora_rank_error(suite, ranks=[1, 4, 8])
    by_rank = errors.groupby("rank")["relative_error"].mean()
    assert by_rank.is_monotonic_decreasing and by_rank.loc[8] == pytest.approx(0, abs=1e-5)
    fig = plots.error_vs_rank(errors)
    assert fig.axes[0].get_yscale() == "log"
    sweep = studies.lora_rank_sweep(suite, ranks=[8])
    lora_models = studies.stack_lora(suite)
    assert sweep["accuracy"].tolist() == pytest.approx(bl.evaluate(suite, lora_models)["accuracy"].tolist(), abs=1e-3)
    assert len(plots.accuracy_vs_rank(sweep).axes[0].lines) >= 1
    with pytest.raises(ValueError, match="exceeds the LoRA rank"):
        studies.lora_rank_error(suite, ranks=[16])


def test_num_tasks_and_base_merger_studies(reduced):
    suite, _ = reduced
    study = studies.num_tasks_study(suite, methods=["task_arithmetic", "byom_fft"], orders=1)
    assert set(study["k"]) == {2} and set(study["method"]) == {"task_arithmetic", "byom_fft"}
    assert plots.accuracy_vs_num_tasks(study).axes[0].get_xlabel() == "number of tasks merged"
    bases = studies.base_merger_study(suite, bases=["simple_average"], density=0.5)
    assert set(bases["with_byom"]) == {"no", "BYOM-FFT m=50%"}


def test_headline_table_has_every_row_and_accuracy_vs_params(reduced):
    suite, _ = reduced
    table = headline_table(suite, split="val", densities=(0.05,), lambda_grid=(0.3,), ties_densities=(0.2,), ties_grid=(1.0,), ranks=(2,))
    assert {"zero-shot (pretrained)", "task arithmetic", "BYOM-FFT m=5%", "post-pruning m=5%"} <= set(table.index)
    assert table.loc["individual fine-tuned (full)", "normalized"] == pytest.approx(100)
    n = sum(v.numel() for v in suite.pretrained.values())
    assert table.loc["individual fine-tuned (full)", "extra_bytes_per_task"] == 4 * n
    assert table.loc["task arithmetic", "extra_bytes_per_task"] == 0
    byom = table.loc["BYOM-FFT m=5%"]
    assert byom["extra_params_per_task"] == pytest.approx(0.05 * n, rel=0.01)
    assert byom["extra_bytes_per_task"] == pytest.approx(8 * byom["extra_params_per_task"], rel=1e-5)  # int32 index + float32 value
    fig = plots.accuracy_vs_params(table)
    assert fig.axes[0].get_xscale() == "log"


def test_fast_byom_matches_the_merging_core(reduced):
    suite, _ = reduced
    fast = FastByom(suite, lam=0.3)
    ref = merging.byom_fft(suite.pretrained, suite.finetuned, density=0.05, lam=0.3)
    for t in range(len(suite.tasks)):
        got, want = fast.task_state_dict("task_arithmetic", t, 0.05), ref.task_state_dict(t)
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    accs = byom_accuracies(fast, 5, tasks=["signs"], limit=50)
    assert list(accs) == ["signs"] and 0 <= accs["signs"] <= 1
    with pytest.raises(ValueError, match="density"):
        fast.task_state_dict("task_arithmetic", 0, 0)
    with pytest.raises(ValueError, match="at least one task"):
        byom_accuracies(fast, 5, tasks=[])


def test_widget_callback_updates_its_output(reduced):
    suite, _ = reduced
    panel = ByomPanel(suite, limit=40)
    first = dict(panel.last)
    panel.m.value = 100.0  # every parameter kept: each task gets its fine-tuned model back
    assert panel.last == pytest.approx(panel.reference)
    assert panel.last != first or first == panel.reference
    panel.checks[0].value = False
    assert list(panel.last) == suite.tasks[1:] and panel.message.startswith("m = 100%")
    for c in panel.checks:
        c.value = False
    assert panel.last is None and panel.message == "select at least one task"


def test_fast_lora_matches_the_merging_core_and_its_panel_updates(reduced):
    suite, _ = reduced
    fast = FastLora(suite)
    ref = merging.byom_lora(suite.pretrained, suite.lora, rank=2)
    got, want = fast.task_state_dict(1, 2), ref.task_state_dict(1)
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    with pytest.raises(ValueError, match="rank must lie in 1..8"):
        fast.task_state_dict(0, 9)
    panel = LoraPanel(suite, limit=40)
    panel.q.value = fast.max_rank  # q = r: every task gets its LoRA model back
    assert panel.last == pytest.approx(panel.reference) and panel.message.startswith("q = 8")
    for c in panel.checks:
        c.value = False
    assert panel.last is None and panel.message == "select at least one task"
