"""The fused CPU kernels (byom_lab/merging/native.c) against the eager torch path: same bits, same errors."""
import math

import pytest
import torch

from byom_lab import merging as M
from byom_lab.merging import native, select

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the fused kernels are not built")

SHAPES = {"attn": (96, 64), "mlp": (256, 64), "bias": (64,), "empty": (0, 4), "conv": (8, 3, 4, 4)}


@pytest.fixture(autouse=True)
def small_sample(monkeypatch):
    """Sampled windows (hence the one-pass selection) at test sizes: inputs of 4·64 entries and up."""
    monkeypatch.setattr(select, "SAMPLE", 64)


def make_models(num_tasks=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    fts = [{k: v + torch.randn(v.shape, generator=gen) * 0.01 * (1 + t) for k, v in pre.items()}
           for t in range(num_tasks)]
    fts[0]["bias"][:5] = pre["bias"][:5]  # exact zeros in a task vector
    return pre, fts


CALLS = {
    "task_arithmetic": lambda p, f: M.task_arithmetic(p, f, lam=0.3),
    "simple_average": M.simple_average,
    "ties_global_mean": lambda p, f: M.ties(p, f, density=0.2, lam=1.3),
    "ties_global_sum": lambda p, f: M.ties(p, f, density=0.2, merge="sum"),
    "ties_tensor": lambda p, f: M.ties(p, f, density=0.3, scope="tensor"),
    "trim_mean": lambda p, f: M.merge_with_recipe(p, f, M.Recipe(lam=0.7, density=0.3, merge="mean")).merged,
    "byom_fft": lambda p, f: M.byom_fft(p, f, density=0.1),
    "byom_fft_on_ties": lambda p, f: M.byom_fft(p, f, density=0.05, base="ties"),
    "byom_fft_tensor": lambda p, f: M.byom_fft(p, f, density=0.1, scope="tensor"),
    "post_pruning": lambda p, f: M.post_pruning(p, f, density=0.1),
}


def assert_same(a, b):
    """Equal bits (values and dtypes) of two merged dicts or two sparse results."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        return
    assert a.density == b.density
    assert_same(a.merged, b.merged)
    for ea, eb in zip(a.entries, b.entries, strict=True):
        for k in ea:
            assert ea[k].indices.dtype == eb[k].indices.dtype == torch.int32, k
            assert torch.equal(ea[k].indices, eb[k].indices) and torch.equal(ea[k].values, eb[k].values), k


def eager(call, *args, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(native, "applies", lambda *tensors: False)
        return call(*args)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_fused_kernels_give_the_eager_bits(name, threads, monkeypatch, kernel_calls):
    pre, fts = make_models()
    before = [{k: v.clone() for k, v in ft.items()} for ft in fts]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = CALLS[name](pre, fts)
    finally:
        torch.set_num_threads(old)
    assert kernel_calls["merge"] + kernel_calls["select"] > 0  # the fused path was taken
    assert kernel_calls["select"] > 0 or name in ("task_arithmetic", "simple_average")  # so was the selection
    assert_same(fused, eager(CALLS[name], pre, fts, monkeypatch=monkeypatch))
    assert all(torch.equal(ft[k], b[k]) for ft, b in zip(fts, before) for k in ft)  # inputs untouched


@pytest.mark.parametrize("name", ["task_arithmetic", "ties_global_mean", "post_pruning", "byom_fft"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_entry_is_named_on_the_fused_path(name, bad, monkeypatch, kernel_calls):
    pre, fts = make_models()
    fts[2]["mlp"][7, 3] = bad
    with pytest.raises(ValueError, match=r"finetuned\[2\] key 'mlp' contains NaN or Inf"):
        CALLS[name](pre, fts)
    assert kernel_calls["merge"] + kernel_calls["select"] > 0
    pre, fts = make_models()
    pre["attn"][0, 0] = -bad
    with pytest.raises(ValueError, match=r"pretrained key 'attn' contains NaN or Inf"):
        CALLS[name](pre, fts)


def test_a_missed_window_falls_back_for_that_task_only(monkeypatch):
    pre, fts = make_models()
    expected = eager(CALLS["post_pruning"], pre, fts, monkeypatch=monkeypatch)
    original, guesses = select._window, []

    def wrong_for_task_1(*args):
        guesses.append(original(*args))
        return (0x7F000000, 0x7F000001) if len(guesses) == 2 else guesses[-1]  # far above every key

    monkeypatch.setattr(select, "_window", wrong_for_task_1)
    results = []
    original_select = native.select
    monkeypatch.setattr(native, "select", lambda *a: results.append(original_select(*a)) or results[-1])
    assert_same(M.post_pruning(pre, fts, density=0.1), expected)
    assert [r is None for r in results[0]] == [False, True, False, False]


def test_full_buffers_are_handed_over_and_joined(monkeypatch):
    monkeypatch.setattr(native, "CANDIDATE_SLACK", 0.0)  # room for one block of candidates at a time
    monkeypatch.setattr(native, "WINDOW_SHARE", 1 << 30)  # and of window keys
    refills = []
    original = native._refill
    monkeypatch.setattr(native, "_refill", lambda *a: refills.append(1) or original(*a))
    pre, fts = make_models()
    for name in ["post_pruning", "ties_global_mean"]:
        assert_same(CALLS[name](pre, fts), eager(CALLS[name], pre, fts, monkeypatch=monkeypatch))
    pieces_and_tasks = 4 * 4  # four non-empty tensors, four tasks: the first buffers of each
    assert len(refills) > 2 * pieces_and_tasks


def test_the_portable_build_gives_the_same_bits(tmp_path, monkeypatch):
    """native.c without AVX2 (its generic left-pack) and without -march=native."""
    target = tmp_path / "portable.so"
    native.compile_library(target, arch=("-mno-avx2",) if native.platform.machine() == "x86_64" else ())
    monkeypatch.setattr(native, "_library", lambda: native.load_library(target))
    pre, fts = make_models()
    for name in ["post_pruning", "ties_global_mean", "byom_fft"]:
        assert_same(CALLS[name](pre, fts), eager(CALLS[name], pre, fts, monkeypatch=monkeypatch))


def test_without_a_compiler_the_eager_path_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BYOM_LAB_HOME", str(tmp_path / "home"))
    native._library.cache_clear()
    try:
        assert not native.available()
        with pytest.raises(OSError, match="cannot run the C compiler"):
            native.compile_library(tmp_path / "x.so")
        pre, fts = make_models()
        assert torch.equal(M.task_arithmetic(pre, fts)["attn"], pre["attn"] + 0.3 * sum(f["attn"] - pre["attn"] for f in fts))
        assert list((tmp_path / "home").glob("native/*")) == []  # nothing half-written
    finally:
        native._library.cache_clear()


def test_native_off_switch(monkeypatch):
    monkeypatch.setenv("BYOM_LAB_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert not native.available() and not native.applies(torch.zeros(3))
    finally:
        native._library.cache_clear()
