"""The evaluation forward (agrees with open_clip's), the memo of predictions (a lookup, and a miss when one bit changes)."""
import copy
import math

import pytest
import torch

import byom_lab as bl
from byom_lab import forward, memo
from byom_lab.evaluation import predictions
from byom_lab.finetune import FinetuneConfig, apply_lora, finetune_lora
from byom_lab.model import encode_images


@pytest.fixture
def fresh_memo(tmp_path, monkeypatch):
    """An empty memo in its own cache directory."""
    monkeypatch.setenv("BYOM_LAB_HOME", str(tmp_path / "memo-home"))
    return tmp_path / "memo-home" / "predictions"


def _open_clip_predictions(suite, state_dict, t, split="test"):
    x, y = suite.inputs(t, split)
    with torch.inference_mode():
        feats = encode_images(suite.visual, x, state_dict)
    return (feats @ suite.heads[t].T).argmax(1)


def test_forward_matches_open_clip(reduced):
    suite, _ = reduced
    assert forward.supports(suite.visual)
    x, _ = suite.inputs(0, "val")
    for sd in (suite.pretrained, suite.finetuned[1], apply_lora(suite.pretrained, suite.lora[0])):
        with torch.inference_mode():
            ours = torch.nn.functional.normalize(forward.image_features(suite.visual, sd, x), dim=-1)
            theirs = encode_images(suite.visual, x, sd)
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)  # attention kernels round differently


def test_predictions_equal_open_clips_on_every_task(reduced, fresh_memo):
    suite, _ = reduced
    for t in range(len(suite.tasks)):
        for sd in (suite.pretrained, suite.finetuned[t]):
            pred, y = predictions(suite, sd, t, "test")
            assert torch.equal(pred, _open_clip_predictions(suite, sd, t)) and len(y) == len(pred)


def test_factored_lora_path_equals_the_dense_update(reduced):
    """W x + B (A x) in the forward gives the features of the dense W + B A, and the same gradients for B, A."""
    suite, _ = reduced
    x, _ = suite.inputs(0, "val")
    x = x[:16]
    lora = {k: (b.clone().requires_grad_(True), a.clone().requires_grad_(True)) for k, (b, a) in suite.lora[0].items()}
    dense = {**suite.pretrained, **{k: suite.pretrained[k] + b @ a for k, (b, a) in lora.items()}}
    f_dense = forward.image_features(suite.visual, dense, x)
    g_dense = torch.autograd.grad(f_dense.square().sum(), [p for ba in lora.values() for p in ba])
    f_fact = forward.image_features(suite.visual, suite.pretrained, x, lora=lora)
    g_fact = torch.autograd.grad(f_fact.square().sum(), [p for ba in lora.values() for p in ba])
    torch.testing.assert_close(f_fact, f_dense, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fact, g_dense):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_unsupported_towers_fall_back_to_open_clips_forward(reduced):
    suite, _ = reduced
    visual = copy.deepcopy(suite.visual)
    visual.transformer.resblocks[0].mlp.gelu = torch.nn.SiLU()
    assert not forward.supports(visual)
    x, y = suite.data[suite.tasks[0]]["train"]
    cfg = FinetuneConfig(epochs=1, batch_size=48)
    lora = finetune_lora(visual, suite.pretrained, suite.heads[0], suite.logit_scale, x[:48], y[:48], cfg)
    assert set(lora) == set(suite.lora[0]) and all(torch.isfinite(b).all() for b, _ in lora.values())


def test_a_repeat_is_a_lookup_and_one_ulp_is_a_miss(reduced, fresh_memo, monkeypatch):
    suite, _ = reduced
    calls = []
    real = bl.evaluation._predict
    monkeypatch.setattr(bl.evaluation, "_predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = bl.evaluate(suite, suite.finetuned, split="val")
    n = len(suite.tasks)
    assert len(calls) == n  # the reference accuracies and the rows are the same models: evaluated once
    again = bl.evaluate(suite, suite.finetuned, split="val")
    assert len(calls) == n and again.equals(first)  # all from the memo
    nudged = dict(suite.finetuned[0])
    key = next(iter(nudged))
    flat = nudged[key].clone().reshape(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(math.inf))
    nudged[key] = flat.reshape(suite.finetuned[0][key].shape)
    assert memo.state_digest(nudged) != memo.state_digest(suite.finetuned[0])
    bl.evaluate(suite, [nudged, suite.finetuned[1]], split="val")
    assert len(calls) == n + 1  # only the changed model is evaluated again
    assert len(list(fresh_memo.rglob("*.npy"))) == n + 1


def test_memo_keys_cover_head_limit_and_data(reduced, fresh_memo):
    suite, _ = reduced
    sd = suite.pretrained
    predictions(suite, sd, 0, "val")
    predictions(suite, sd, 0, "val", limit=10)
    predictions(suite, sd, 0, "test")
    predictions(suite, sd, 1, "val")
    other_head = torch.nn.functional.normalize(torch.randn_like(suite.heads[0]), dim=-1)
    pred, _ = predictions(suite, sd, 0, "val", head=other_head)
    assert len(list(fresh_memo.rglob("*.npy"))) == 5
    with torch.inference_mode():
        x, _ = suite.inputs(0, "val")
        expected = (encode_images(suite.visual, x, sd) @ other_head.T).argmax(1)
    assert torch.equal(pred, expected)


def test_corrupted_memo_entry_is_recomputed_with_a_warning(reduced, fresh_memo):
    suite, _ = reduced
    pred, _ = predictions(suite, suite.finetuned[0], 0, "val")
    (entry,) = list(fresh_memo.rglob("*.npy"))
    entry.write_bytes(b"\x93NUMPY garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        again, _ = predictions(suite, suite.finetuned[0], 0, "val")
    assert torch.equal(again, pred)


def test_memo_off_computes_every_time(reduced, fresh_memo, monkeypatch):
    suite, _ = reduced
    monkeypatch.setenv("BYOM_LAB_MEMO", "0")
    predictions(suite, suite.pretrained, 0, "val")
    assert not fresh_memo.exists()


def test_evaluate_uses_a_results_own_heads(reduced, fresh_memo):
    suite, _ = reduced

    class WithHeads:
        num_tasks = len(suite.tasks)

        def task_state_dict(self, t):
            return suite.pretrained

        def task_head(self, t):
            return -suite.heads[t]  # the opposite head picks the least similar class

    plain = bl.evaluate(suite, suite.pretrained, split="val")
    flipped = bl.evaluate(suite, WithHeads(), split="val")
    assert (flipped["accuracy"] < plain["accuracy"]).all()
