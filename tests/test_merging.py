"""Unit tests of byom_lab.merging: formulas on fixed inputs, accounting, bad inputs, files."""
import math
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from byom_lab import merging as M
from byom_lab.merging.select import chunks

METHODS = ["byom_fft", "byom_lora", "consensus", "dare", "emr", "fisher", "post_pruning", "regmean", "simple_average",
           "tall_masks", "task_arithmetic", "ties"]
TEST_TIME = ["adamerging", "adamerging_plus", "tinting", "tinting_plus"]


pytestmark = pytest.mark.usefixtures("one_thread")  # merging results are compared bit for bit


def make_models(num_tasks=3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 5), "b": (7,), "conv": (2, 3, 2, 2)}
    pre = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in pre.items()}
           for _ in range(num_tasks)]
    return pre, fts


def make_lora(pre, num_tasks=3, r=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"w": (torch.randn(6, r, generator=gen), torch.randn(r, 5, generator=gen))} for _ in range(num_tasks)]


def ties_reference(pre, fts, density, lam, scope, merge):
    """TIES transcribed from the formula, with top() for trimming."""
    trimmed = [M.top(v, density, scope)[0] for v in M.task_vectors(pre, fts)]
    out = {}
    for k in pre:
        V = torch.stack([t[k] for t in trimmed])  # (T, *shape)
        gamma = torch.where(V.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(V) == gamma
        tau = (V * agree).sum(0)
        if merge == "mean":
            tau = tau / agree.sum(0).clamp_min(1)
        out[k] = pre[k] + lam * tau
    return out


def test_registry_lists_every_method():
    import byom_lab as bl

    assert set(M.list_methods()) >= set(METHODS)
    assert bl.list_methods() == sorted(METHODS + TEST_TIME)  # the package-level list loads the test-time methods too
    assert M.list_methods() == bl.list_methods()
    assert all(callable(M.get_method(name)) for name in METHODS + TEST_TIME)
    assert bl.list_methods("test images") == TEST_TIME and M.list_methods(("statistics",)) == ["fisher", "regmean"]


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown merging method 'tie'.*task_arithmetic"):
        M.get_method("tie")


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):
        M.registry.register("ties")(lambda p, f: p)


def test_task_vectors_and_linear_mergers():
    pre, fts = make_models()
    tvs = M.task_vectors(pre, fts)
    for k in pre:
        assert torch.allclose(tvs[1][k], fts[1][k] - pre[k])
        mean = torch.stack([ft[k] for ft in fts]).mean(0)
        assert torch.allclose(M.simple_average(pre, fts)[k], mean, atol=1e-6)
        expected = pre[k] + 0.4 * sum(tv[k] for tv in tvs)
        assert torch.allclose(M.task_arithmetic(pre, fts, lam=0.4)[k], expected, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
def test_ties_matches_the_formula(scope, merge, density):
    pre, fts = make_models(num_tasks=4, seed=1)
    out = M.ties(pre, fts, density=density, lam=0.7, scope=scope, merge=merge)
    ref = ties_reference(pre, fts, density, 0.7, scope, merge)
    for k in pre:
        assert torch.allclose(out[k], ref[k], atol=1e-6), k


def test_ties_elects_plus_one_where_the_sum_is_zero():
    pre = {"x": torch.zeros(2)}
    fts = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([-1.0, -2.0])}]
    assert torch.equal(M.ties(pre, fts, density=1.0, lam=1.0)["x"], torch.tensor([1.0, 2.0]))


def test_global_and_tensor_scope_rank_differently():
    pre = {"big": torch.zeros(10), "small": torch.zeros(10)}
    ft = {"big": torch.arange(1.0, 11.0), "small": torch.arange(1.0, 11.0) / 100}
    kept_global, d_global = M.top(M.task_vectors(pre, [ft])[0], 0.5, "global")
    kept_tensor, d_tensor = M.top(M.task_vectors(pre, [ft])[0], 0.5, "tensor")
    assert (kept_global["big"] != 0).sum() == 10 and (kept_global["small"] != 0).sum() == 0
    assert (kept_tensor["big"] != 0).sum() == 5 and (kept_tensor["small"] != 0).sum() == 5
    assert d_global == d_tensor == 0.5


def test_top_keeps_every_tie_at_the_threshold():
    x = {"a": torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, 0.0])}
    kept, density = M.top(x, 2 / 6)  # k = 2: the 2nd largest |x| is 2, tied three times
    assert torch.equal(kept["a"], torch.tensor([3.0, -2.0, 2.0, 2.0, 0.0, 0.0]))
    assert density == 4 / 6
    kept, density = M.top(x, 1.0)  # zero threshold: zeros are not "kept"
    assert density == 5 / 6 and torch.equal(kept["a"], x["a"])


def _counting_source(x, piece, passes):
    def source(stride):
        passes.append(stride)
        return chunks(x[::stride], piece)
    return source


@pytest.mark.parametrize("k", [3000, 30_000])  # 6%: candidates in one pass; 60%: radix inside the window
def test_selection_uses_the_sampled_window_and_its_fallbacks(monkeypatch, k):
    from byom_lab.merging import select

    monkeypatch.setattr(select, "SAMPLE", 1024)
    monkeypatch.setattr(select, "MAX_BINS", 1 << 22)  # small samples give wide windows
    calls, passes = [], []
    original = select._digit_histogram
    monkeypatch.setattr(select, "_digit_histogram", lambda *a: calls.append(a[1:]) or original(*a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=gen)
    expected = x.abs().sort(descending=True).values[k - 1]
    thr, kept, where = select.top_positions(_counting_source(x, 999, passes), k, x.numel())
    assert thr == expected and kept == k
    assert torch.equal(where, (x.abs() >= expected).nonzero().squeeze(1))
    if k == 3000:  # a peek at the first piece, then one pass keeping the candidates; no histogram
        assert calls == [] and passes.count(1) == 2
    else:  # a peek, histogram passes inside the window (no full-range digit), then the positions
        assert 1 <= len(calls) <= 2 and calls[0][0] < 16 and passes.count(1) == len(calls) + 2

    stride = x.numel() // 1024
    for planted in (100.0, 0.0):  # the sample sees only huge values, then only zeros: the guess misses
        y = x.clone()
        y[::stride] = planted
        expected = y.abs().sort(descending=True).values[k - 1]
        thr, kept, where = select.top_positions(_counting_source(y, 999, []), k, y.numel())
        assert thr == expected and kept == int((y.abs() >= expected).sum())
        assert torch.equal(where, (y.abs() >= expected).nonzero().squeeze(1))


def test_dare_is_seeded():
    pre, fts = make_models()
    a, b = M.dare(pre, fts, drop=0.5, seed=3), M.dare(pre, fts, drop=0.5, seed=3)
    c = M.dare(pre, fts, drop=0.5, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in pre)
    assert any(not torch.equal(a[k], c[k]) for k in pre)


def test_dare_composes_with_ties_and_rejects_other_bases():
    pre, fts = make_models()
    out = M.dare(pre, fts, drop=0.3, base="ties", density=0.5, lam=0.8)
    assert set(out) == set(pre)
    with pytest.raises(ValueError, match="dare base must be one of"):
        M.dare(pre, fts, base="emr")
    with pytest.raises(ValueError, match="unknown merging method"):
        M.dare(pre, fts, base="nope")


@pytest.mark.parametrize("base", ["task_arithmetic", "ties", "simple_average", "emr", "dare"])
def test_byom_fft_keeps_the_top_of_the_residual_to_any_base(base):
    pre, fts = make_models(num_tasks=3, seed=2)
    res = M.byom_fft(pre, fts, density=0.2, base=base)
    merged = M.get_method(base)(pre, fts)
    merged = merged.merged if hasattr(merged, "merged") else merged
    for t, ft in enumerate(fts):
        residual = {k: ft[k] - merged[k] for k in pre}
        kept, _ = M.top(residual, 0.2)
        task = res.task_state_dict(t)
        for k in pre:
            assert torch.allclose(res.merged[k], merged[k])
            assert torch.allclose(task[k], merged[k] + kept[k], atol=1e-6)


def test_byom_fft_passes_base_options_and_accepts_a_callable_base():
    pre, fts = make_models()
    a = M.byom_fft(pre, fts, density=0.1, lam=0.5)
    assert all(torch.allclose(a.merged[k], M.task_arithmetic(pre, fts, lam=0.5)[k]) for k in pre)
    b = M.byom_fft(pre, fts, density=0.1, base=partial(M.ties, density=0.5))
    assert all(torch.allclose(b.merged[k], M.ties(pre, fts, density=0.5)[k]) for k in pre)
    with pytest.raises(ValueError, match="merges LoRA factors"):
        M.byom_fft(pre, fts, base="byom_lora")


def test_post_pruning_is_pretrained_plus_top_task_vector():
    pre, fts = make_models(seed=4)
    res = M.post_pruning(pre, fts, density=0.25, scope="tensor")
    for t, tv in enumerate(M.task_vectors(pre, fts)):
        kept, density = M.top(tv, 0.25, "tensor")
        assert res.density[t] == density
        assert all(torch.allclose(res.task_state_dict(t)[k], pre[k] + kept[k], atol=1e-6) for k in pre)
    assert all(torch.equal(res.merged[k], pre[k]) for k in pre)


def test_sparse_accounting_counts_kept_entries_and_index_value_bytes():
    pre, fts = make_models()
    n = sum(v.numel() for v in pre.values())
    res = M.byom_fft(pre, fts, density=0.1)
    for t in range(3):
        kept = sum((res.task_state_dict(t)[k] != res.merged[k]).sum().item() for k in pre)
        assert res.num_params(t) == kept == round(res.density[t] * n)
        assert res.nbytes(t) == kept * (4 + 4)  # int32 index + float32 value per entry
        assert all(e.indices.dtype == torch.int32 for e in res.entries[t].values())
    assert res.num_tasks == 3 and abs(res.num_params() - 0.1 * n) <= 1
    with pytest.raises(ValueError, match="task index"):
        res.task_state_dict(3)


def test_byom_lora_counts_q_times_dout_plus_din_plus_one():
    pre, _ = make_models()
    lora = make_lora(pre, r=3)
    res = M.byom_lora(pre, lora, rank=2)
    assert res.num_params(0) == 2 * (6 + 5 + 1)
    assert res.nbytes(0) == 4 * 2 * (6 + 5 + 1)
    U, S, V = res.factors[0]["w"]
    dense = lora[0]["w"][0] @ lora[0]["w"][1]
    u, s, vh = torch.linalg.svd(dense)
    assert torch.allclose(S, s[:2], rtol=1e-5)
    assert torch.allclose((U * S) @ V.T, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4)


def test_byom_lora_merged_base_compresses_the_residual():
    pre, _ = make_models()
    lora = make_lora(pre, num_tasks=3, r=2)
    res = M.byom_lora(pre, lora, rank=2, base="merged", lam=0.3)
    deltas = [B @ A for B, A in (task["w"] for task in lora)]
    merged_w = pre["w"] + 0.3 * sum(deltas)
    assert torch.allclose(res.merged["w"], merged_w, atol=1e-5)
    for t in range(3):
        u, s, vh = torch.linalg.svd(deltas[t] - 0.3 * sum(deltas))
        expected = merged_w + (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(res.task_state_dict(t)["w"], expected, atol=1e-4)
        assert torch.equal(res.task_state_dict(t)["b"], pre["b"])


def test_factored_svd_matches_dense_svd():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(40, 4, generator=gen), torch.randn(4, 30, generator=gen)
    U, S, V = M.factored_svd(B, A)
    assert U.shape == (40, 4) and S.shape == (4,) and V.shape == (30, 4)
    assert torch.allclose(S, torch.linalg.svdvals(B @ A)[:4], rtol=1e-5)
    assert torch.allclose((U * S) @ V.T, B @ A, atol=1e-4)
    assert torch.allclose(U.T @ U, torch.eye(4), atol=1e-5)


def test_emr_accounting_counts_mask_bits_and_one_scale():
    pre, fts = make_models()
    n = sum(v.numel() for v in pre.values())  # 30 + 7 + 24 = 61
    res = M.emr(pre, fts)
    assert res.num_params(0) == math.ceil(n / 32) + 1
    assert res.nbytes(0) == sum(math.ceil(v.numel() / 8) for v in pre.values()) + 4
    assert all(m.dtype == torch.uint8 for m in res.masks[0].values())


def test_low_precision_models_keep_their_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        pre, fts = make_models(dtype=dtype)
        out = M.ties(pre, fts, density=0.3)
        assert all(out[k].dtype == dtype for k in pre)
        res = M.byom_fft(pre, fts, density=1.0)
        assert all(torch.equal(res.task_state_dict(1)[k], fts[1][k]) for k in pre)


# bad inputs ---------------------------------------------------------------------------------------

def test_mismatched_shapes_name_the_key_and_both_shapes():
    pre, fts = make_models()
    fts[1]["w"] = torch.zeros(5, 6)
    message = r"finetuned\[1\] key 'w' has shape \(5, 6\) but pretrained has shape \(6, 5\)"
    with pytest.raises(ValueError, match=message):
        M.task_arithmetic(pre, fts)


def test_mismatched_keys_name_the_first_offending_key():
    pre, fts = make_models()
    del fts[0]["b"]
    with pytest.raises(ValueError, match=r"finetuned\[0\] is missing key 'b'"):
        M.ties(pre, fts)
    pre, fts = make_models()
    fts[2]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"finetuned\[2\] has key 'extra'"):
        M.emr(pre, fts)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "0.5"])
def test_density_outside_the_unit_interval(density):
    pre, fts = make_models()
    for call in (M.ties, M.byom_fft, M.post_pruning):
        with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
            call(pre, fts, density=density)
    with pytest.raises(ValueError, match="density"):
        M.top(pre, density)


@pytest.mark.parametrize("rank", [0, 4, -1])
def test_rank_outside_one_to_r(rank):
    pre, _ = make_models()
    with pytest.raises(ValueError, match="rank must"):
        M.byom_lora(pre, make_lora(pre, r=3), rank=rank)


def test_bad_lora_shapes_and_names():
    pre, _ = make_models()
    with pytest.raises(ValueError, match=r"B \(5, 3\) @ A \(3, 5\)"):
        M.byom_lora(pre, [{"w": (torch.randn(5, 3), torch.randn(3, 5))}], rank=1)
    with pytest.raises(ValueError, match="'nope' is not a key of pretrained"):
        M.byom_lora(pre, [{"nope": (torch.randn(5, 3), torch.randn(3, 5))}], rank=1)
    with pytest.raises(ValueError, match="base must be one of"):
        M.byom_lora(pre, make_lora(pre), rank=1, base="average")


@pytest.mark.parametrize("bad", [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0]),
                                 torch.tensor([1, 2])])
def test_non_float_or_non_finite_tensors(bad):
    pre = {"x": torch.zeros(2)}
    for models in ([{"x": bad}], None):
        p, f = (pre, models) if models else ({"x": bad}, [pre])
        match = "NaN or Inf" if bad.is_floating_point() else "dtype torch.int64"
        with pytest.raises(ValueError, match=rf"key 'x'.*{match}|{match}"):
            M.task_arithmetic(p, f)


def test_empty_and_malformed_model_lists():
    pre, _ = make_models()
    for name in ("simple_average", "task_arithmetic", "ties", "dare", "byom_fft", "post_pruning", "emr"):
        with pytest.raises(ValueError, match="non-empty list"):
            M.get_method(name)(pre, [])
    with pytest.raises(ValueError, match="non-empty list"):
        M.byom_lora(pre, [], rank=1)
    with pytest.raises(ValueError, match="non-empty dict"):
        M.task_arithmetic({}, [{}])


def test_dtype_mismatch_and_bad_options():
    pre, fts = make_models()
    fts[0]["b"] = fts[0]["b"].double()
    with pytest.raises(ValueError, match="key 'b' has dtype torch.float64 but pretrained has torch.float32"):
        M.simple_average(pre, fts)
    pre, fts = make_models()
    with pytest.raises(ValueError, match="scope must be one of"):
        M.ties(pre, fts, scope="layer")
    with pytest.raises(ValueError, match="merge must be one of"):
        M.ties(pre, fts, merge="max")
    with pytest.raises(ValueError, match=r"drop must lie in \[0, 1\)"):
        M.dare(pre, fts, drop=1.0)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        M.task_arithmetic(pre, fts, lam=float("inf"))


# files ---------------------------------------------------------------------------------------------

def save_models(tmp_path, pre, fts):
    save_file(pre, tmp_path / "pre.safetensors")
    paths = []
    for t, ft in enumerate(fts):
        paths.append(tmp_path / f"ft{t}.safetensors")
        save_file(ft, paths[-1])
    return tmp_path / "pre.safetensors", paths


def test_streamed_merges_equal_the_in_memory_ones(tmp_path):
    pre, fts = make_models(num_tasks=3, seed=5)
    pre_path, paths = save_models(tmp_path, pre, fts)
    out = M.task_arithmetic_files(pre_path, paths, tmp_path / "ta.safetensors", lam=0.3)
    merged = load_file(out)
    assert all(torch.equal(merged[k], M.task_arithmetic(pre, fts, lam=0.3)[k]) for k in pre)
    for scope in ("global", "tensor"):
        merged = load_file(M.ties_files(pre_path, paths, tmp_path / "ties.safetensors", density=0.3, scope=scope))
        assert all(torch.equal(merged[k], M.ties(pre, fts, density=0.3, scope=scope)[k]) for k in pre)
    recipe = M.Recipe(lam=0.5, drop=0.4, seed=2)
    merged = load_file(M.merge_files(pre_path, paths, tmp_path / "dare.safetensors", recipe))
    assert all(torch.equal(merged[k], M.dare(pre, fts, drop=0.4, seed=2, lam=0.5)[k]) for k in pre)


def test_a_failed_streamed_merge_leaves_the_old_output_and_no_temp_file(tmp_path):
    pre, fts = make_models()
    fts[1]["conv"][0, 0, 0, 0] = float("nan")
    pre_path, paths = save_models(tmp_path, pre, fts)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    with pytest.raises(ValueError, match="ft1.safetensors key 'conv' contains NaN"):
        M.task_arithmetic_files(pre_path, paths, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0.safetensors", "ft1.safetensors",
                                                          "ft2.safetensors", "out.safetensors", "pre.safetensors"]


def test_streamed_merge_checks_the_file_layouts(tmp_path):
    pre, fts = make_models()
    fts[2]["w"] = torch.zeros(3, 10)
    pre_path, paths = save_models(tmp_path, pre, fts)
    with pytest.raises(ValueError, match=r"ft2.safetensors key 'w' is F32 \(3, 10\) but pretrained is F32 \(6, 5\)"):
        M.task_arithmetic_files(pre_path, paths, tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="at least one checkpoint"):
        M.task_arithmetic_files(pre_path, [], tmp_path / "out.safetensors")


def test_results_do_not_depend_on_the_chunk_size(monkeypatch):
    from byom_lab.merging import select

    pre, fts = make_models(num_tasks=3, seed=6)
    runs = {}
    for chunk in (select.CHUNK, 7):  # 7 splits every tensor into several uneven chunks
        monkeypatch.setattr(select, "CHUNK", chunk)
        runs[chunk] = [M.ties(pre, fts, density=0.3), M.ties(pre, fts, density=0.3, scope="tensor"),
                       M.task_arithmetic(pre, fts), M.byom_fft(pre, fts, density=0.2).task_state_dict(1),
                       M.post_pruning(pre, fts, density=0.2, scope="tensor").task_state_dict(2)]
    for a, b in zip(*runs.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in pre)


@pytest.mark.parametrize("options", [
    dict(consensus=True, merge="mean"), dict(consensus=True, merge="sum"),
    dict(consensus=False, merge="mean"), dict(consensus=True, merge="mean", drop=0.3, seed=5),
])
def test_chunk_major_and_task_major_trimming_agree(monkeypatch, options):
    """In memory every task passes over a chunk in turn; streaming holds one task at a time. Same numbers."""
    from byom_lab.merging import general, select

    monkeypatch.setattr(select, "SAMPLE", 512)  # large enough inputs take the one-pass candidate path
    gen = torch.Generator().manual_seed(1)
    pre = {"a": torch.randn(40, 50, generator=gen), "b": torch.randn(3000, generator=gen)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in pre.items()} for _ in range(4)]
    recipe = M.Recipe(density=0.15, lam=0.7, **options)
    out = M.merge_with_recipe(pre, fts, recipe)
    kept = [0] * len(fts)
    dense = dict(general.merge_getters(list(pre), pre.__getitem__, [ft.__getitem__ for ft in fts], recipe, kept,
                                       task_major=True))
    assert all(torch.equal(out.merged[k], dense[k]) for k in pre)
    assert out.density == [n / 5000 for n in kept]
