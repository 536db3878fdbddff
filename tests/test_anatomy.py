"""Lesson 00's measurements and figures: zero-shot scores and confusions, captioned classes, weight drift, storage."""
from types import SimpleNamespace

import matplotlib
import pytest
import torch

import byom_lab as bl
from byom_lab import plots
from byom_lab.analysis import anatomy
from byom_lab.evaluation import predictions

matplotlib.use("Agg")


def test_zero_shot_scores_are_cosines_whose_argmax_is_the_prediction(reduced):
    suite, _ = reduced
    scores = anatomy.zero_shot_scores(suite, "signs", limit=40)
    pred, _ = predictions(suite, suite.pretrained, "signs", limit=40)
    assert scores.shape == (40, len(suite.classes[suite.task_index("signs")]))
    assert scores.abs().max() <= 1 + 1e-5  # unit features · unit class embeddings
    assert torch.equal(scores.argmax(1), pred)
    tuned = anatomy.zero_shot_scores(suite, "signs", suite.finetuned[suite.task_index("signs")], limit=40)
    assert not torch.allclose(tuned, scores)  # the state dict is used


def test_confusion_matrix_counts_every_image_and_its_trace_is_the_accuracy(reduced):
    suite, _ = reduced
    t = suite.task_index("textures")
    cm = anatomy.confusion_matrix(suite, "textures", suite.finetuned[t])
    _, y = suite.data["textures"]["test"]
    assert cm.values.sum() == len(y)
    assert list(cm.index) == list(cm.columns) == suite.classes[t]
    assert cm.values.sum(1).tolist() == torch.bincount(y, minlength=len(suite.classes[t])).tolist()  # rows: true classes
    acc = bl.evaluate(suite, suite.finetuned, tasks=["textures"])["accuracy"].iloc[0]
    assert cm.values.trace() / cm.values.sum() == pytest.approx(acc)


def test_captioned_classes_come_from_the_manifest_and_follow_split_tasks(reduced):
    suite, _ = reduced
    expected = {"textures": {0, 1, 2, 4}, "signs": {0, 3, 6, 7}}
    assert anatomy.captioned_classes(suite) == [expected[t] for t in suite.tasks]
    similar = SimpleNamespace(tasks=["cars_a", "cars_b"])  # cars' captioned classes are 0, 4, 9
    assert anatomy.captioned_classes(similar) == [{0, 4}, {4}]
    with pytest.raises(ValueError, match="tiny-suite"):
        anatomy.captioned_classes(SimpleNamespace(tasks=["MNIST"]))


def test_task_table_describes_each_task(reduced):
    suite, _ = reduced
    table = anatomy.task_table(suite).set_index("task")
    assert list(table.index) == suite.tasks
    assert table.loc["textures", "mirrors"] == "DTD" and table.loc["signs", "mirrors"] == "GTSRB"
    assert table.loc["textures", "classes"] == 10 and table.loc["textures", "captioned"] == 4
    assert table.loc["signs", "train"] == 96  # the reduced suite keeps 96 training images
    assert table.loc["signs", "test"] == len(suite.data["signs"]["test"][1])


def test_class_accuracy_adds_up_to_the_task_accuracy(reduced):
    suite, _ = reduced
    table = anatomy.class_accuracy(suite)
    acc = bl.evaluate(suite, suite.pretrained)
    for task, rows in table.groupby("task"):
        n = len(suite.data[task]["test"][1])
        assert rows["images"].sum() == rows["predicted"].sum() == n
        weighted = (rows["accuracy"] * rows["images"]).sum() / n
        assert weighted == pytest.approx(acc.set_index("task").loc[task, "accuracy"])
    assert table.loc[table["task"] == "textures", "captioned"].tolist()[:3] == [True, True, True]
    tuned = anatomy.class_accuracy(suite, suite.finetuned)
    assert tuned["accuracy"].mean() != table["accuracy"].mean()


def test_layer_and_kind_of_vit_tensors():
    assert anatomy.layer_of("transformer.resblocks.3.attn.in_proj_weight") == "block 3"
    assert anatomy.kind_of("transformer.resblocks.3.attn.in_proj_weight") == "attention"
    assert anatomy.kind_of("transformer.resblocks.0.mlp.c_fc.bias") == "mlp"
    assert anatomy.kind_of("transformer.resblocks.0.ln_2.weight") == "norm"
    assert (anatomy.layer_of("proj"), anatomy.kind_of("proj")) == ("head", "projection")
    assert anatomy.layer_of("ln_post.bias") == "head" and anatomy.kind_of("ln_post.bias") == "norm"
    assert anatomy.layer_of("conv1.weight") == anatomy.layer_of("positional_embedding") == "embedding"
    assert anatomy.layer_order(["head", "block 10", "block 2", "embedding"]) == ["embedding", "block 2", "block 10", "head"]


def test_weight_drift_on_synthetic_state_dicts():
    theta0 = {"conv1.weight": torch.full((4,), 2.0), "transformer.resblocks.0.mlp.c_fc.weight": torch.ones(2, 2),
              "transformer.resblocks.0.ln_1.weight": torch.ones(4), "proj": torch.ones(3)}
    moved = {**theta0, "transformer.resblocks.0.mlp.c_fc.weight": torch.ones(2, 2) + 0.5}
    drift = anatomy.weight_drift(theta0, [theta0, moved], ["still", "moved"])
    assert len(drift) == 2 * len(theta0)
    assert (drift.loc[drift.task == "still", "relative"] == 0).all()
    row = drift[(drift.task == "moved") & (drift.tensor == "transformer.resblocks.0.mlp.c_fc.weight")].iloc[0]
    assert row["relative"] == pytest.approx(0.5) and row["kind"] == "mlp" and row["layer"] == "block 0"
    layers = anatomy.layer_drift(drift)
    assert layers[layers.task == "moved"]["layer"].tolist() == ["embedding", "block 0", "head"]
    block = layers[(layers.task == "moved") & (layers.layer == "block 0")]["relative"].iloc[0]
    assert block == pytest.approx((4 * 0.25 / (4 + 4)) ** 0.5)  # squared norms of the block's two tensors add
    total = anatomy.total_drift(drift)
    assert total.index.tolist() == ["still", "moved"] and total["still"] == 0
    assert total["moved"] == pytest.approx((4 * 0.25 / (16 + 4 + 4 + 3)) ** 0.5)
    with pytest.raises(ValueError):
        anatomy.weight_drift(theta0, [theta0], ["a", "b"])


def test_storage_counts_towers_adapters_and_heads(reduced):
    suite, _ = reduced
    table = anatomy.storage(suite).set_index("stored")
    n = sum(v.numel() for v in suite.pretrained.values())
    one, full, lora, heads = table["parameters"].tolist()
    assert one == n and full == 2 * n
    assert lora == n + sum(b.numel() + a.numel() for task in suite.lora for b, a in task.values())
    assert heads == sum(h.numel() for h in suite.heads)
    assert table["megabytes"].iloc[0] == pytest.approx(4 * n / 2**20)
    assert table["times_one_tower"].tolist()[:2] == [1.0, 2.0]


def test_lesson_00_figures(reduced):
    suite, _ = reduced
    cms = {t: anatomy.confusion_matrix(suite, t) for t in suite.tasks}
    fig = plots.task_confusions(suite, cms, anatomy.captioned_classes(suite))
    assert len(fig.axes) == 4
    labels = [t.get_text() for t in fig.axes[2 + suite.task_index("textures")].get_yticklabels()]
    assert labels[0].startswith("0 • ") and labels[3].startswith("3 ") and "•" not in labels[3]  # textures: 0 captioned, 3 not
    table = bl.evaluate(suite, suite.pretrained).assign(model="zero-shot")
    assert plots.accuracy_by_task(table).axes[0].get_title() == "Accuracy per task"
    assert plots.captioned_vs_codeword(anatomy.class_accuracy(suite)).axes[0].get_legend() is not None
    drift = anatomy.layer_drift(anatomy.weight_drift(suite.pretrained, suite.finetuned, suite.tasks))
    ax = plots.drift_by_layer(drift).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "embedding" and len(ax.get_lines()) >= 2
    matplotlib.pyplot.close("all")
