import os
import time

import pytest
import torch

import byom_lab as bl
from byom_lab.finetune import FinetuneConfig, apply_lora

QUICK = dict(tasks=["textures", "signs"], finetune=FinetuneConfig(epochs=1), max_train=96)


def test_reduced_suite_builds_in_under_a_minute(reduced):
    suite, seconds = reduced
    assert seconds < 60
    assert suite.tasks == ["signs", "textures"]  # the suite's order, not the request's
    assert len(suite.finetuned) == len(suite.lora) == len(suite.heads) == 2
    for sd in suite.finetuned:
        assert sd.keys() == suite.pretrained.keys()
    for name, (b, a) in suite.lora[0].items():
        d_out, d_in = suite.pretrained[name].shape
        assert b.shape == (d_out, 8) and a.shape == (8, d_in)


def test_fine_tuning_moved_the_weights_and_helps(reduced):
    suite, _ = reduced
    moved = sum((suite.finetuned[0][k] - v).abs().sum() for k, v in suite.pretrained.items())
    assert moved > 0
    zs = bl.evaluate(suite, suite.pretrained, split="val")
    ft = bl.evaluate(suite, suite.finetuned, split="val")
    assert list(ft.columns) == ["task", "accuracy", "normalized_accuracy"]
    assert ft["normalized_accuracy"].tolist() == [1.0, 1.0]
    assert ft["accuracy"].mean() > zs["accuracy"].mean()


def test_the_test_home_does_not_leak_into_the_session(reduced, session_home, monkeypatch):
    """Outside a test the environment is the user's: nbval's notebook kernels, started later in the run, must
    find the built suite, not rebuild it in the tests' home."""
    assert os.environ["BYOM_LAB_HOME"] == str(session_home)  # inside a test: the session's home
    monkeypatch.undo()  # what the session itself holds between tests
    assert os.environ.get("BYOM_LAB_HOME") != str(session_home)


def test_second_load_hits_the_cache_and_is_identical(reduced):
    suite, _ = reduced
    start = time.time()
    again = bl.load_suite("tiny", **QUICK)
    assert time.time() - start < 10
    for a, b in zip(suite.finetuned, again.finetuned):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cold_rebuild_is_deterministic(reduced, tmp_path, monkeypatch):
    suite, _ = reduced
    monkeypatch.setenv("BYOM_LAB_HOME", str(tmp_path))
    other = bl.load_suite("tiny", tasks=["signs"], finetune=QUICK["finetune"], max_train=96)
    assert all(torch.equal(suite.finetuned[0][k], other.finetuned[0][k]) for k in other.finetuned[0])
    lora_a, lora_b = suite.lora[0], other.lora[0]
    assert all(torch.equal(lora_a[k][0], lora_b[k][0]) for k in lora_a)


def test_corrupted_checkpoint_is_rebuilt(reduced, tmp_path, monkeypatch):
    monkeypatch.setenv("BYOM_LAB_HOME", str(tmp_path))
    bl.load_suite("tiny", tasks=["signs"], finetune=QUICK["finetune"], max_train=32)
    victim = next((tmp_path / "full").rglob("signs.safetensors"))
    victim.write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning, match="unreadable"):
        suite = bl.load_suite("tiny", tasks=["signs"], finetune=QUICK["finetune"], max_train=32)
    assert suite.finetuned[0].keys() == suite.pretrained.keys()


def test_lora_models_evaluate(reduced):
    suite, _ = reduced
    models = [apply_lora(suite.pretrained, lora) for lora in suite.lora]
    df = bl.evaluate(suite, models, split="val")
    assert df["accuracy"].between(0, 1).all()


def test_bad_names_and_models_are_clear_errors(reduced):
    suite, _ = reduced
    with pytest.raises(ValueError, match="unknown suite 'tiny-huge'.*tiny-similar"):
        bl.load_suite("tiny-huge")
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        bl.load_suite("tiny", tasks=["mnist"])
    with pytest.raises(ValueError, match="unknown task 'cars'"):
        bl.evaluate(suite, suite.pretrained, tasks=["cars"])
    with pytest.raises(ValueError, match="unknown split"):
        bl.evaluate(suite, suite.pretrained, split="dev")
    bad = dict(suite.pretrained)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    bad[key] = bad[key][:10]
    with pytest.raises(ValueError, match=f"{key}.*\\(10, 256\\).*\\(1024, 256\\)"):
        bl.evaluate(suite, bad)
    with pytest.raises(ValueError, match="missing key"):
        bl.evaluate(suite, {k: v for k, v in suite.pretrained.items() if k != key})
    with pytest.raises(ValueError, match="got 1 state dicts"):
        bl.evaluate(suite, [suite.pretrained])
