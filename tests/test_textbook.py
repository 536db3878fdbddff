"""The fast merging paths against byom_lab.merging.textbook, the plain-torch oracle, on the fused and eager paths.

Tolerances: the fast path sums task vectors in a running float32 sum over tasks while the
textbook calls `.sum(0)` on a (T, N) stack, and it writes θ_t's own values where the textbook
computes anchor + (θ_t − anchor): the two can differ by a few ulps (EXACT below). Entries are
compared at fixed positions, so a kept or dropped entry that differs fails at once.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from byom_lab import merging as M
from byom_lab.merging import native, select
from byom_lab.merging import textbook as tb

DENSITIES = [0.01, 0.1, 0.5, 1.0]
EXACT = {"rtol": 1e-6, "atol": 1e-6}  # a few float32 ulps at |θ| ≈ 1–4: summation order, θ0 + (θ_t − θ0) vs θ_t
SHAPES = {"attn.weight": (24, 16), "attn.bias": (24,), "conv.weight": (4, 3, 2, 4), "ln.weight": (16,)}
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("one_thread")  # merging results are compared bit for bit


@pytest.fixture(params=["fused", "eager"])
def path(request, monkeypatch, kernel_calls):
    """Run the fast functions on the fused C kernels, or on the eager torch path with the kernels off."""
    if request.param == "fused":
        if not native.available():
            pytest.skip("no C compiler: the fused kernels are not built")
        monkeypatch.setattr(select, "SAMPLE", 8)  # sampled windows (the fused selection) from 32 entries up
    else:
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param


def assert_ran(path, kernel_calls, selected=True):
    """The fused kernels ran on the fused path (the selection too when `selected`), never on the eager one."""
    if path == "fused":
        assert kernel_calls["merge"] + kernel_calls["select"] > 0
        assert kernel_calls["select"] > 0 or not selected
    else:
        assert kernel_calls == {"merge": 0, "select": 0}


def distinct(n, gen):
    """n values with distinct magnitudes (spaced ≥ 0.5/n apart) and random signs: no ties in top()."""
    magnitudes = (torch.randperm(n, generator=gen) + 1 + 0.5 * torch.rand(n, generator=gen)) / n
    return magnitudes * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)


def make_models(shapes=SHAPES, num_tasks=3, seed=0):
    """(θ0, [θ_t]): float32, θ0 ~ N(0, 1), task vectors of distinct magnitudes and task-dependent scale."""
    gen = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    n = sum(t.numel() for t in pre.values())
    fts = [{k: pre[k] + v for k, v in tb.unflatten(distinct(n, gen) * 0.1 * (1 + t), pre).items()}
           for t in range(num_tasks)]
    return pre, fts


def assert_dicts_close(actual, expected, **tol):
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].shape == expected[k].shape and actual[k].dtype == expected[k].dtype, k
        assert_close(actual[k], expected[k], **(tol or EXACT), msg=lambda m, k=k: f"{k}: {m}")


def test_flatten_unflatten_round_trip():
    sd = {"z": torch.randn(3, 4), "a": torch.randn(5), "empty": torch.zeros(0, 2),
          "d": torch.randn(2, 1, 3, dtype=torch.float64)}
    flat = tb.flatten(sd)
    assert flat.shape == (12 + 5 + 0 + 6,)
    assert torch.equal(flat[:12], sd["z"].reshape(-1).double()) and torch.equal(flat[12:17], sd["a"].double())
    back = tb.unflatten(flat, sd)
    assert list(back) == list(sd)  # keys in the dict's order
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    assert torch.equal(tb.flatten(back), flat)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 400), st.floats(0.001, 1.0))
def test_top_keeps_exactly_the_largest_round_density_n(seed, n, density):
    x = distinct(n, torch.Generator().manual_seed(seed)) * 3
    kept = tb.top(x, density)
    k = max(1, round(density * n))
    on = kept != 0
    assert int(on.sum()) == k
    assert torch.equal(kept[on], x[on])  # kept entries are unchanged
    if k < n:
        assert x[on].abs().min() > x[~on].abs().max()  # and they are the largest
    fast, realised = M.top({"x": x}, density)  # the fast selection agrees where nothing ties
    assert torch.equal(fast["x"], kept) and realised == k / n


def test_task_vectors_match():
    pre, fts = make_models(num_tasks=4)
    fast, plain = M.task_vectors(pre, fts), tb.task_vectors(pre, fts)
    assert len(fast) == len(plain) == 4
    for f, p in zip(fast, plain, strict=True):
        assert list(f) == list(p) and all(torch.equal(f[k], p[k]) for k in f)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_task_arithmetic_and_simple_average(num_tasks, path, kernel_calls):
    pre, fts = make_models(num_tasks=num_tasks, seed=num_tasks)
    for lam in (0.3, 0.75):
        assert_dicts_close(M.task_arithmetic(pre, fts, lam=lam), tb.task_arithmetic(pre, fts, lam=lam))
    assert_dicts_close(M.simple_average(pre, fts), tb.simple_average(pre, fts))
    assert_ran(path, kernel_calls, selected=False)


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_ties_global(num_tasks, merge, path, kernel_calls):
    pre, fts = make_models(num_tasks=num_tasks, seed=10 + num_tasks)
    for density in [0.05, 0.2, *DENSITIES]:
        fast = M.ties(pre, fts, density=density, lam=0.9, scope="global", merge=merge)
        assert_dicts_close(fast, tb.ties(pre, fts, density=density, lam=0.9, merge=merge))
    assert_ran(path, kernel_calls)


@pytest.mark.parametrize("num_tasks", [2, 4])
def test_post_pruning(num_tasks, path, kernel_calls):
    pre, fts = make_models(num_tasks=num_tasks, seed=20 + num_tasks)
    for density in DENSITIES:
        fast, plain = M.post_pruning(pre, fts, density=density), tb.post_pruning(pre, fts, density=density)
        assert_dicts_close(fast.merged, pre)
        for t in range(num_tasks):
            assert_dicts_close(fast.task_state_dict(t), plain[t])
        assert fast.num_params() == max(1, round(density * tb.flatten(pre).numel()))
    assert_ran(path, kernel_calls)


@pytest.mark.parametrize("lam", [0.3, 0.8])
@pytest.mark.parametrize("num_tasks", [2, 5])
def test_byom_fft(num_tasks, lam, path, kernel_calls):
    pre, fts = make_models(num_tasks=num_tasks, seed=30 + num_tasks)
    for density in DENSITIES:
        fast = M.byom_fft(pre, fts, density=density, lam=lam)
        merged, per_task = tb.byom_fft(pre, fts, density=density, lam=lam)
        assert_dicts_close(fast.merged, merged)
        for t in range(num_tasks):
            assert_dicts_close(fast.task_state_dict(t), per_task[t])
    assert_ran(path, kernel_calls)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_emr(num_tasks):
    pre, fts = make_models(num_tasks=num_tasks, seed=40 + num_tasks)
    fast, plain = M.emr(pre, fts), tb.emr(pre, fts)
    assert len(plain) == num_tasks
    for t in range(num_tasks):
        # s_t: the fast path sums in float64 per tensor, the textbook in float32 over all of N
        assert_dicts_close(fast.task_state_dict(t), plain[t], rtol=1e-5, atol=1e-6)


def test_sign_conventions_at_a_zero_sum(path, kernel_calls):
    """Where Σ v_t = 0 exactly, TIES elects +1 and EMR elects 0; a task whose EMR mask is empty keeps θ0."""
    pre = {"w": torch.ones(4, 8), "b": torch.zeros(4)}
    up = {"w": torch.full((4, 8), 1.5), "b": torch.zeros(4)}  # v = +0.5 on w, 0 on b
    down = {"w": torch.full((4, 8), 0.5), "b": torch.zeros(4)}  # v = −0.5: the sum is exactly 0
    for merge in ("mean", "sum"):  # γ = +1: only "up" agrees, so mean and sum both give τ = 0.5
        fast = M.ties(pre, [up, down], density=1.0, lam=0.8, merge=merge)
        assert_dicts_close(fast, tb.ties(pre, [up, down], density=1.0, lam=0.8, merge=merge))
        assert_close(fast["w"], torch.full((4, 8), 1 + 0.8 * 0.5))
        assert torch.equal(fast["b"], pre["b"])
    assert_ran(path, kernel_calls, selected=False)
    double_down = {"w": torch.full((4, 8), 0.0), "b": torch.zeros(4)}  # v = −1: γ = −1, task "up" is masked out
    for fts in ([up, down], [up, double_down], [pre, up]):
        fast, plain = M.emr(pre, fts), tb.emr(pre, fts)
        for t in range(2):
            assert_dicts_close(fast.task_state_dict(t), plain[t])
    assert torch.equal(tb.emr(pre, [up, down])[0]["w"], pre["w"])  # γ = 0: τ = 0
    assert torch.equal(tb.emr(pre, [up, double_down])[0]["w"], pre["w"])  # empty mask: s_t = 0
    assert torch.equal(tb.emr(pre, [up, double_down])[1]["w"], double_down["w"])


def make_lora(pre, num_tasks, r, seed):
    """LoRA factors for the 2-D tensors of `pre`, with well-separated singular values (a unique rank-q SVD)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.linspace(1.0, 0.25, r).unsqueeze(1)  # (r, 1)
    return [{k: (torch.randn(w.shape[0], r, generator=gen) * 0.1, torch.randn(r, w.shape[1], generator=gen) * spread)
             for k, w in pre.items() if w.dim() == 2} for _ in range(num_tasks)]


@pytest.mark.parametrize("num_tasks", [2, 4])
def test_byom_lora_every_rank(num_tasks):
    pre = {"q.weight": torch.randn(16, 12), "q.bias": torch.randn(16), "fc.weight": torch.randn(8, 20)}
    r = 4
    lora = make_lora(pre, num_tasks, r, seed=num_tasks)
    for q in range(1, r + 1):
        fast, plain = M.byom_lora(pre, lora, rank=q), tb.byom_lora(pre, lora, rank=q)
        for t in range(num_tasks):
            out = fast.task_state_dict(t)
            assert torch.equal(out["q.bias"], pre["q.bias"]) and torch.equal(plain[t]["q.bias"], pre["q.bias"])
            # SVD from the factors (QR + r×r core) vs of the dense product: different rounding inside
            # the SVD, measured below 1.5e-6 here (|ΔW| < 0.3, |θ| < 4)
            assert_dicts_close(out, plain[t], rtol=4e-6, atol=4e-6)
    full = tb.byom_lora(pre, lora, rank=r)[0]  # and rank r restores θ0 + B A
    assert_close(full["fc.weight"], pre["fc.weight"] + lora[0]["fc.weight"][0] @ lora[0]["fc.weight"][1],
                 rtol=1e-5, atol=1e-5)


def test_dare_without_drop_is_task_arithmetic(path, kernel_calls):
    pre, fts = make_models(num_tasks=3, seed=50)
    plain = tb.dare(pre, fts, drop=0.0, lam=0.4, seed=7)
    expected = tb.task_arithmetic(pre, fts, lam=0.4)
    assert all(torch.equal(plain[k], expected[k]) for k in pre)  # exactly, not approximately
    assert_dicts_close(M.dare(pre, fts, drop=0.0, lam=0.4, seed=7), plain)
    assert_ran(path, kernel_calls, selected=False)


@pytest.mark.parametrize("drop", [0.3, 0.7])
def test_dare_drops_entries_and_rescales_survivors(drop):
    """One task: every entry of θ − θ0 is 0 or λ·v/(1−p), on the fast and the textbook path alike."""
    pre, fts = make_models(num_tasks=1, seed=60)
    lam, n = 0.5, tb.flatten(pre).numel()
    theta0, rescaled = tb.flatten(pre), tb.flatten(tb.task_arithmetic(pre, fts, lam=lam / (1 - drop)))
    for merged in (tb.dare(pre, fts, drop=drop, lam=lam, seed=3), M.dare(pre, fts, drop=drop, lam=lam, seed=3)):
        flat = tb.flatten(merged)
        kept = flat != theta0
        assert_close(flat[kept], rescaled[kept], **EXACT)
        assert abs(int(kept.sum()) / n - (1 - drop)) < 0.12  # about 6 standard deviations at n = 520


@pytest.mark.parametrize("drop", [0.3, 0.6])
def test_dare_is_unbiased(drop):
    """Averaged over seeds, DARE's merge approaches task arithmetic (the fast path's too)."""
    pre, fts = make_models(num_tasks=3, seed=70)
    lam, seeds = 0.4, 300
    v = torch.stack([tb.flatten(ft) for ft in fts]) - tb.flatten(pre)  # (T, N)
    expected = tb.flatten(tb.task_arithmetic(pre, fts, lam=lam))
    stderr = lam * (v.double().pow(2).sum(0) * drop / (1 - drop)).sqrt() / seeds**0.5  # (N,)
    for dare in (tb.dare, M.dare):
        draws = torch.stack([tb.flatten(dare(pre, fts, drop=drop, lam=lam, seed=s)) for s in range(seeds)])
        assert not torch.equal(draws[0], draws[1])  # the seed changes the masks
        z = (draws.double().mean(0) - expected) / stderr  # (N,)
        assert z.abs().max() < 5.5, dare  # no entry further than 5.5 standard errors (N = 520)
        assert abs(float(z.mean())) < 5.5 / tb.flatten(pre).numel() ** 0.5  # nor the whole vector
    assert torch.equal(tb.flatten(tb.dare(pre, fts, drop=drop, seed=1)), tb.flatten(tb.dare(pre, fts, drop=drop, seed=1)))


shape_lists = st.tuples(st.integers(1, 12), st.integers(1, 12), st.lists(
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), max_size=2))


@SETTINGS
@given(shape_lists, st.integers(2, 5), st.floats(0.01, 1.0), st.integers(0, 2**31 - 1))
def test_fast_paths_equal_the_textbook(path, kernel_calls, shapes, num_tasks, density, seed):
    rows, cols, extra = shapes
    layout = {"w": (rows, cols), "b": (rows,), **{f"x{i}": s for i, s in enumerate(extra)}}  # a matrix, its bias, more
    pre, fts = make_models(layout, num_tasks, seed)
    for merge in ("mean", "sum"):
        fast = M.ties(pre, fts, density=density, lam=1.0, merge=merge)
        assert_dicts_close(fast, tb.ties(pre, fts, density=density, lam=1.0, merge=merge))
    pruned, pruned_tb = M.post_pruning(pre, fts, density=density), tb.post_pruning(pre, fts, density=density)
    fft, (merged, fft_tb) = M.byom_fft(pre, fts, density=density, lam=0.3), tb.byom_fft(pre, fts, density=density)
    assert_dicts_close(fft.merged, merged)
    for t in range(num_tasks):
        assert_dicts_close(pruned.task_state_dict(t), pruned_tb[t])
        assert_dicts_close(fft.task_state_dict(t), fft_tb[t])
    assert_ran(path, kernel_calls, selected=False)  # the fused selection needs 32+ entries and density < 1


def test_key_order_of_the_finetuned_dicts_does_not_matter():
    """Checkpoints read from files list keys in another order than θ0: entry i must stay the same weight."""
    g = torch.Generator().manual_seed(3)
    pre = {"b": torch.randn(5, generator=g), "a": torch.randn(3, 4, generator=g), "c": torch.randn(2, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    shuffled = [dict(sorted(ft.items())) for ft in fts]  # a, b, c: not θ0's order
    assert list(shuffled[0]) != list(pre)
    for fn in (tb.task_arithmetic, tb.simple_average, tb.ties):
        want, got = fn(pre, fts), fn(pre, shuffled)
        assert all(torch.equal(want[k], got[k]) for k in pre)
    _, want = tb.byom_fft(pre, fts, density=0.2)
    _, got = tb.byom_fft(pre, shuffled, density=0.2)
    assert all(torch.equal(w[k], x[k]) for w, x in zip(want, got) for k in pre)
    assert all(torch.equal(w[k], x[k]) for w, x in zip(tb.emr(pre, fts), tb.emr(pre, shuffled)) for k in pre)
    assert all(torch.equal(w[k], x[k]) for w, x in zip(tb.post_pruning(pre, fts, 0.2), tb.post_pruning(pre, shuffled, 0.2))
               for k in pre)
