import pytest
import torch

from byom_lab import manifest as mf
from byom_lab.tiny import sources
from byom_lab.tiny.text import EOT, SOT, UNK, Tokenizer, build_vocab

MAIN = mf.suites()["tiny"]


@pytest.mark.parametrize("name", [n for n in MAIN if n != "handwritten_digits"])
def test_generator_shapes_range_and_determinism(name):
    spec = mf.tiny_tasks()[name]
    gen = sources.GENERATORS[spec.generator]
    labels = torch.arange(40) % len(spec.classes)
    a = gen(labels, torch.Generator().manual_seed(1))
    b = gen(labels, torch.Generator().manual_seed(1))
    c = gen(labels, torch.Generator().manual_seed(2))
    assert a.shape == (40, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", MAIN)
def test_classes_differ_on_average(name):
    """Every pair of class-mean images differs: the classes carry a visual signal."""
    spec = mf.tiny_tasks()[name]
    x, y = sources.make_splits(spec)["val"]
    means = torch.stack([x[y == c].float().mean(0) for c in range(len(spec.classes))]) / 255
    dist = torch.cdist(means.flatten(1), means.flatten(1))
    off_diagonal = dist[~torch.eye(len(means), dtype=torch.bool)]
    assert off_diagonal.min() > 0.5


def test_splits_sizes_balance_and_determinism():
    spec = mf.tiny_tasks()["textures"]
    a, b = sources.make_splits(spec), sources.make_splits(spec)
    for split, (x, y) in a.items():
        assert x.dtype == torch.uint8 and x.shape == (spec.sizes[split], 3, 32, 32)
        counts = torch.bincount(y, minlength=len(spec.classes))
        assert counts.max() - counts.min() <= 1
        assert torch.equal(x, b[split][0]) and torch.equal(y, b[split][1])
    assert not torch.equal(a["train"][0][:10], a["test"][0][:10])


def test_handwritten_digits_are_real_and_split_disjoint():
    spec = mf.tiny_tasks()["handwritten_digits"]
    splits = sources.make_splits(spec)
    total = sum(len(y) for _, y in splits.values())
    assert total == 1797
    rows = {split: {bytes(img.numpy()) for img in x} for split, (x, _) in splits.items()}
    assert not rows["train"] & rows["test"]


def test_similar_pair_splits_the_classes_of_one_task():
    tasks = mf.tiny_tasks()
    a, b = tasks["cars_a"], tasks["cars_b"]
    assert set(a.classes) | set(b.classes) == set(tasks["cars"].classes)
    assert not set(a.classes) & set(b.classes)
    x, y = sources.make_splits(a)["test"]
    assert y.max() == len(a.classes) - 1 and len(x) == len(y) == 250


def test_tokenizer_roundtrip_and_unknown_words():
    vocab = build_vocab(mf.tiny_tasks(), mf.templates())
    tok = Tokenizer(vocab)
    ids = tok(["a photo of a sedan.", "a photo of a zeppelin"])
    assert ids.shape == (2, 16)
    assert ids[0, 0] == SOT and EOT in ids[0].tolist()
    assert vocab[int(ids[0, 5])] == "sedan"
    assert UNK in ids[1].tolist()
