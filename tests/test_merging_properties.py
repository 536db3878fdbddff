"""Property tests of byom_lab.merging on small random state dicts (hypothesis)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byom_lab import merging as M
from byom_lab.merging.select import chunks, kth_largest_magnitude, num_kept

settings.register_profile("merging", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
SETTINGS = settings.get_profile("merging")

# keyword arguments under which merging T copies of one model must return that model
IDENTITY = {
    "simple_average": lambda T: {},
    "task_arithmetic": lambda T: {"lam": 1 / T},
    "ties": lambda T: {"density": 1.0, "lam": 1.0},
    "dare": lambda T: {"drop": 0.0, "base": "simple_average"},
    "byom_fft": lambda T: {"density": 0.3, "base": "simple_average"},
    "post_pruning": lambda T: {"density": 1.0},
    "emr": lambda T: {},
    "byom_lora": lambda T: {},  # rank = r, filled in below
    "tall_masks": lambda T: {"lams": 0.0, "alpha": 1 / T},  # every mask all ones: θ0 + τ/T
    "consensus": lambda T: {"lams": 0.0, "lam": 1 / T, "k": 1},  # k = 2 would drop everything when T = 1
}
DATA_FREE = ("finetuned", "lora")  # Fisher and RegMean need statistics of images: tests/test_data_methods.py


pytestmark = pytest.mark.usefixtures("one_thread")  # merging results are compared bit for bit


shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3)


@st.composite
def models(draw, min_tasks=1, max_tasks=4):
    """(θ0, [θ_t]) with random shapes; values continuous or on a coarse grid (ties and zeros)."""
    shape_list = draw(shapes)
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    seed = draw(st.integers(0, 2**31 - 1))
    grid = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)

    def values(shape):
        x = torch.randn(shape, generator=gen)
        return torch.round(x * 2) / 2 if grid else x

    pre = {f"p{i}": values(s) for i, s in enumerate(shape_list)}
    fts = [{k: v + values(v.shape) for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


def as_dicts(result, num_tasks):
    """Every task's state dict, whether the method returns one dict or a result object."""
    if isinstance(result, dict):
        return [result] * num_tasks
    return [result.task_state_dict(t) for t in range(num_tasks)]


def snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    return type(obj)(snapshot(v) for v in obj)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)


def test_every_registered_method_has_an_identity_case():
    assert set(IDENTITY) == set(M.list_methods(DATA_FREE))


@SETTINGS
@given(models(max_tasks=1), st.integers(1, 4), st.integers(1, 3))
def test_merging_copies_of_one_model_returns_it(data, num_tasks, r):
    pre, (ft,) = data
    copies = [ft] * num_tasks
    gen = torch.Generator().manual_seed(num_tasks)
    matrix = next(k for k, v in pre.items())
    pre2 = {**pre, matrix: pre[matrix].reshape(pre[matrix].shape[0], -1)}
    lora_one = {matrix: (torch.randn(pre2[matrix].shape[0], r, generator=gen),
                         torch.randn(r, pre2[matrix].shape[1], generator=gen))}
    for name in M.list_methods(DATA_FREE):
        kwargs = IDENTITY[name](num_tasks)
        if name == "byom_lora":
            for base in ("pretrained", "merged"):
                res = M.byom_lora(pre2, [lora_one] * num_tasks, rank=r, base=base)
                expected = pre2[matrix] + lora_one[matrix][0] @ lora_one[matrix][1]
                for sd in as_dicts(res, num_tasks):
                    assert torch.allclose(sd[matrix], expected, rtol=1e-4, atol=1e-4), (name, base)
            continue
        for sd in as_dicts(M.get_method(name)(pre, copies, **kwargs), num_tasks):
            for k in pre:
                assert torch.allclose(sd[k], ft[k], rtol=1e-5, atol=1e-6), (name, k)


@SETTINGS
@given(models(), st.sampled_from(["global", "tensor"]),
       st.sampled_from(["task_arithmetic", "ties", "simple_average", "emr", "dare"]))
def test_density_one_restores_every_finetuned_model_exactly(data, scope, base):
    pre, fts = data
    for res in (M.byom_fft(pre, fts, density=1.0, base=base, scope=scope),
                M.post_pruning(pre, fts, density=1.0, scope=scope)):
        for t, ft in enumerate(fts):
            assert_same(res.task_state_dict(t), ft)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7))
def test_byom_lora_at_full_rank_restores_every_lora_model(seed, num_tasks, r, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(d_out, d_in, generator=gen), "b": torch.randn(d_out, generator=gen)}
    lora = [{"w": (torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen))}
            for _ in range(num_tasks)]
    res = M.byom_lora(pre, lora, rank=r)
    for t, task in enumerate(lora):
        expected = pre["w"] + task["w"][0] @ task["w"][1]
        scale = expected.abs().max()
        assert torch.allclose(res.task_state_dict(t)["w"], expected, atol=1e-5 * scale + 1e-6)
        assert torch.equal(res.task_state_dict(t)["b"], pre["b"])
        q = min(r, d_out, d_in)  # B A has at most min(d_out, d_in) singular triplets
        assert res.num_params(t) == q * (d_out + d_in + 1)


@SETTINGS
@given(models(min_tasks=2), st.floats(0.1, 2.0))
def test_ties_without_sign_conflicts_is_the_scaled_mean(data, lam):
    pre, fts = data
    sign = {k: torch.where(v >= 0, 1.0, -1.0) for k, v in pre.items()}
    fts = [{k: pre[k] + sign[k] * ((ft[k] - pre[k]).abs() + 0.1) for k in pre} for ft in fts]  # no zeros
    out = M.ties(pre, fts, density=1.0, lam=lam)
    for k in pre:
        mean = torch.stack([ft[k] - pre[k] for ft in fts]).mean(0)
        assert torch.allclose(out[k], pre[k] + lam * mean, rtol=1e-5, atol=1e-5)


def realised_within_ties(x: dict, density: float, scope: str, realised: float) -> None:
    """Assert the kept count of top(x, density) is round(density·n) plus at most the ties."""
    groups = [torch.cat([v.reshape(-1) for v in x.values()])] if scope == "global" else \
        [v.reshape(-1) for v in x.values()]
    kept = 0
    for g in groups:
        k = num_kept(density, g.numel())
        thr = g.abs().sort(descending=True).values[k - 1]
        ties = int((g.abs() == thr).sum())
        kept_here = int((g.abs() >= thr).sum()) if thr > 0 else int((g != 0).sum())
        assert kept_here <= k + ties - 1
        assert kept_here >= k or thr == 0
        kept += kept_here
    assert realised == kept / sum(g.numel() for g in groups)


@SETTINGS
@given(models(), st.floats(0.01, 1.0), st.sampled_from(["global", "tensor"]))
def test_realised_density_is_within_the_tie_tolerance(data, density, scope):
    pre, fts = data
    tvs = M.task_vectors(pre, fts)
    kept, realised = M.top(tvs[0], density, scope)
    realised_within_ties(tvs[0], density, scope, realised)
    res = M.post_pruning(pre, fts, density=density, scope=scope)
    out = M.merge_with_recipe(pre, fts, M.Recipe(density=density, scope=scope, consensus=True))
    fft = M.byom_fft(pre, fts, density=density, scope=scope)
    for t, tv in enumerate(tvs):
        realised_within_ties(tv, density, scope, res.density[t])
        if density < 1:
            realised_within_ties(tv, density, scope, out.density[t])
        else:  # nothing is trimmed: merge_with_recipe reports 1.0 without counting zeros
            assert out.density[t] == 1.0
        residual = {k: fts[t][k] - fft.merged[k] for k in pre}
        realised_within_ties(residual, density, scope, fft.density[t])
        assert res.num_params(t) == round(res.density[t] * sum(v.numel() for v in pre.values()))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       st.integers(1, 3000), st.sampled_from(["normal", "grid", "zeros", "tiny"]), st.integers(1, 700),
       st.floats(0.0, 1.0))
def test_radix_select_equals_a_sort(seed, dtype, n, kind, piece, q):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if kind == "grid":
        x = torch.round(x * 3)  # many ties and zeros, both signs
    elif kind == "zeros":
        x = x * (torch.rand(n, generator=gen) < 0.1)
    elif kind == "tiny":
        x = x * 1e-40 if dtype in (torch.float32, torch.float64) else x * 1e-6  # subnormals
    x = x.to(dtype)
    k = min(n, 1 + int(q * n))
    thr, kept = kth_largest_magnitude(lambda s: chunks(x[::s], piece), k, n)
    expected = x.abs().sort(descending=True).values[k - 1]
    assert thr.dtype == dtype and thr == expected
    assert kept == (int((x.abs() >= expected).sum()) if expected > 0 else int((x != 0).sum()))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 0.99))
def test_radix_select_window_guess_is_exact(seed, q):
    from byom_lab.merging import select

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40_000, generator=gen) * torch.rand(40_000, generator=gen)
    k = 1 + int(q * (x.numel() - 1))
    old = select.SAMPLE, select.MAX_BINS
    select.SAMPLE, select.MAX_BINS = 2048, 1 << 12  # force windows, shifts and misses at test size
    try:
        thr, _ = kth_largest_magnitude(lambda s: chunks(x[::s], 3001), k, x.numel())
    finally:
        select.SAMPLE, select.MAX_BINS = old
    assert thr == x.abs().sort(descending=True).values[k - 1]


@SETTINGS
@given(models(min_tasks=2))
def test_emr_matches_a_direct_transcription(data):
    pre, fts = data
    res = M.emr(pre, fts)
    V = {k: torch.stack([ft[k] - pre[k] for ft in fts]) for k in pre}  # (T, *shape)
    tau = {}
    for k, vs in V.items():
        gamma = torch.sign(vs.sum(0))
        eps = torch.where(torch.sign(vs) == gamma, vs.abs(), torch.zeros(())).amax(0)
        tau[k] = gamma * eps
    for t in range(len(fts)):
        mask = {k: (V[k][t] * tau[k]) > 0 for k in pre}
        num = sum(V[k][t].abs().double().sum() for k in pre)
        den = sum((mask[k] * tau[k]).abs().double().sum() for k in pre)
        scale = float(num / den) if den > 0 else 0.0
        assert math.isclose(res.scales[t], scale, rel_tol=1e-6)
        sd = res.task_state_dict(t)
        for k in pre:
            assert torch.allclose(sd[k], pre[k] + scale * mask[k] * tau[k], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(res.merged[k], pre[k] + tau[k]) for k in pre)


@SETTINGS
@given(models(max_tasks=1), st.sampled_from([0.1, 0.5, 0.9]), st.integers(0, 1000))
def test_dare_is_reproducible_and_unbiased(data, drop, seed):
    pre, (ft,) = data
    first = M.dare(pre, [ft], drop=drop, seed=seed, lam=1.0)
    assert_same(first, M.dare(pre, [ft], drop=drop, seed=seed, lam=1.0))
    # mean over S seeds of the dropped-and-rescaled vector estimates v; each entry has variance
    # v²·p/(1−p), so Z = Σ(mean − v) / sqrt(Σ v² p/((1−p)S)) is ~N(0, 1): |Z| < 6 fails with
    # probability ~2e-9 per example
    S = 200
    v = torch.cat([(ft[k] - pre[k]).reshape(-1).double() for k in pre])
    total = torch.zeros_like(v)
    for s in range(S):
        out = M.dare(pre, [ft], drop=drop, seed=seed * S + s, lam=1.0)
        total += torch.cat([(out[k] - pre[k]).reshape(-1).double() for k in pre])
    mean = total / S
    sd = torch.sqrt((v**2).sum() * drop / ((1 - drop) * S))
    if sd > 0:
        assert abs(float((mean - v).sum() / sd)) < 6
    else:
        assert torch.allclose(mean, v)


@SETTINGS
@given(models(min_tasks=2), st.integers(1, 2))
def test_no_method_modifies_its_inputs(data, r):
    pre, fts = data
    matrix = next(iter(pre))
    pre = {**pre, matrix: pre[matrix].reshape(pre[matrix].shape[0], -1)}
    fts = [{**ft, matrix: ft[matrix].reshape(pre[matrix].shape)} for ft in fts]
    lora = [{matrix: (torch.randn(pre[matrix].shape[0], r), torch.randn(r, pre[matrix].shape[1]))} for _ in fts]
    before = snapshot((pre, fts, lora))
    for name in M.list_methods(DATA_FREE):
        if name == "byom_lora":
            for base in ("pretrained", "merged"):
                res = M.byom_lora(pre, lora, rank=r, base=base)
                res.task_state_dict(0)
        else:
            res = M.get_method(name)(pre, fts)
            as_dicts(res, len(fts))
    M.top(pre, 0.5)
    M.task_vectors(pre, fts)
    assert_same((pre, fts, lora), before)
