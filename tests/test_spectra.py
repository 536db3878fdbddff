"""LoRA spectra (analysis.spectra) and their figures (plots.spectra) on synthetic factors with known singular values."""
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from byom_lab.analysis import spectra as sp
from byom_lab.plots import spectra as psp

matplotlib.use("Agg")

SIGMAS = torch.tensor([8.0, 4.0, 2.0, 1.0])


def _factors(d_out, d_in, sigmas, seed=0):
    """B, A with B @ A = U diag(σ) Vᵀ exactly (U, V orthonormal), split unevenly between the factors."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, len(sigmas), generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d_in, len(sigmas), generator=gen, dtype=torch.float64))[0]
    return U * sigmas.double().sqrt() * 3.0, (V * sigmas.double().sqrt() / 3.0).T


def _lora(seed=0):
    return {"transformer.resblocks.0.attn.in_proj_weight": _factors(12, 6, SIGMAS, seed),
            "transformer.resblocks.1.mlp.c_fc.weight": _factors(10, 7, SIGMAS / 2, seed + 1)}


def test_layer_kind_reads_block_and_matrix():
    assert sp.layer_kind("transformer.resblocks.3.mlp.c_fc.weight") == (3, "mlp.c_fc")
    assert sp.layer_kind("transformer.resblocks.0.attn.in_proj_weight") == (0, "attn.in_proj")
    assert sp.layer_kind("conv1.weight") == (-1, "conv1.weight")


def test_singular_values_recovers_the_spectrum():
    df = sp.singular_values([_lora()], tasks=["a"])
    first = df[df["layer"].str.contains("resblocks.0")]
    assert first["sigma"].tolist() == pytest.approx(SIGMAS.tolist(), rel=1e-9)
    assert first["normalized"].tolist() == pytest.approx((SIGMAS / 8).tolist(), rel=1e-9)
    energy = (SIGMAS.double()**2).cumsum(0) / (SIGMAS.double()**2).sum()
    assert first["energy"].tolist() == pytest.approx(energy.tolist(), rel=1e-9)
    assert set(df["kind"]) == {"attn.in_proj", "mlp.c_fc"} and set(df["task"]) == {"a"}
    assert len(sp.singular_values([_lora(), _lora(1)])) == 2 * 2 * 4


def test_truncation_error_is_the_tail_and_matches_the_dense_error():
    df = sp.singular_values([_lora()])
    err = sp.truncation_error(df)
    first = err[err["layer"].str.contains("resblocks.0")].set_index("rank")["relative_error"]
    total = float((SIGMAS**2).sum())
    for q in range(1, 5):
        assert first[q] == pytest.approx(math.sqrt(float((SIGMAS[q:] ** 2).sum()) / total), abs=1e-9)
    assert first[4] == 0.0  # q = r: summed from the tail, exactly zero (no 1 − 0.999… rounding)
    check = sp.eckart_young_check([_lora()], ranks=[1, 2, 3])
    assert np.allclose(check["svd_error"], check["dense_error"], atol=1e-9)
    assert (check["component_error"] >= check["svd_error"] - 1e-12).all()  # Eckart–Young: nothing beats the SVD


def test_component_truncation_keeps_the_heaviest_components():
    B = torch.eye(4)[:, :2] * torch.tensor([3.0, 1.0])  # two orthogonal components of weight 3 and 1
    A = torch.eye(4)[:2]
    assert sp.component_truncation_error(B, A, 1) == pytest.approx(1 / math.sqrt(10))
    assert sp.component_truncation_error(B, A, 2) == pytest.approx(0.0)


def _errors(fn, r=8):
    return pd.DataFrame([{"task": "a", "layer": "w", "kind": "k", "rank": q, "relative_error": fn(q) if q < r else 0.0}
                         for q in range(1, r + 1)])


def test_decay_fit_tells_exponential_from_power_law():
    exp_fit = sp.decay_fit(_errors(lambda q: 0.9 * 0.6**q))
    assert exp_fit["per_rank_factor"] == pytest.approx(0.6)
    assert exp_fit["r2_exponential"] == pytest.approx(1.0) and exp_fit["r2_exponential"] > exp_fit["r2_power"]
    assert exp_fit["ranks_to_halve"] == pytest.approx(math.log(0.5) / math.log(0.6))
    assert exp_fit["last_step_factor"] == pytest.approx(0.6)
    pow_fit = sp.decay_fit(_errors(lambda q: q ** -1.5))
    assert pow_fit["power_exponent"] == pytest.approx(1.5)
    assert pow_fit["r2_power"] == pytest.approx(1.0) and pow_fit["r2_power"] > pow_fit["r2_exponential"]
    with pytest.raises(ValueError, match="at least 3"):
        sp.decay_fit(_errors(lambda q: 0.5**q, r=3))


def test_random_spectrum_is_a_normalised_descending_curve():
    df = sp.random_spectrum(64, 32, 4, samples=3)
    values = df["normalized"].to_numpy()
    assert values[0] == pytest.approx(1.0) and (np.diff(values) <= 0).all() and (values > 0).all()
    assert df["i"].tolist() == [1, 2, 3, 4]


def test_svd_timing_agrees_and_times_both():
    B, A = _factors(40, 30, SIGMAS)
    row = sp.svd_timing(B, A, repeats=2)
    assert row["sigma_difference"] < 1e-5
    assert row["dense_seconds"] > 0 and row["factored_seconds"] > 0 and row["speedup"] > 0
    assert (row["d_out"], row["d_in"], row["r"]) == (40, 30, 4)
    with pytest.raises(ValueError, match="repeats"):
        sp.svd_timing(B, A, repeats=0)
    table = sp.svd_timings({**_lora(), "transformer.resblocks.2.attn.in_proj_weight": _factors(12, 6, SIGMAS)},
                           extra_shapes=[(20, 50)], repeats=1)
    assert table["matrix"].tolist() == ["attn.in_proj", "mlp.c_fc", "random 20×50"]  # one row per distinct shape
    assert table[["d_out", "d_in"]].values.tolist() == [[12, 6], [10, 7], [20, 50]]


def test_storage_by_rank_counts_q_times_dout_plus_din_plus_one():
    pretrained = {"a": torch.zeros(12, 6), "b": torch.zeros(10, 7), "bias": torch.zeros(5)}
    df = sp.storage_by_rank(pretrained, _lora(), ranks=[1, 4]).set_index("rank")
    assert df.loc[1, "byom_lora_params"] == (12 + 6 + 1) + (10 + 7 + 1)
    assert df.loc[4, "byom_lora_params"] == 4 * (12 + 6 + 1) + 4 * (10 + 7 + 1)
    assert df.loc[1, "lora_params"] == 4 * (12 + 6) + 4 * (10 + 7)
    assert df.loc[1, "full_model_params"] == 72 + 70 + 5
    assert df.loc[4, "share_of_lora"] > 1  # q = r stores r numbers more per matrix than the factors (the σ's)


def test_figures_draw_their_data():
    df = sp.singular_values([_lora(), _lora(1)], tasks=["a", "b"])
    fig = psp.singular_value_spectra(df, reference=sp.random_spectrum(12, 6, 4, samples=2))
    left = fig.axes[0]
    assert len(left.lines) == 4 + 1 + 1  # one per (task, matrix), the median, the reference
    errors = sp.truncation_error(df)
    fig = psp.lora_error_decay(errors, fit=sp.decay_fit(errors))
    assert fig.axes[0].get_yscale() == "log" and any(line.get_linestyle() == "--" for line in fig.axes[0].lines)
    timings = pd.DataFrame({"d_out": [4, 8], "d_in": [4, 8], "dense_seconds": [1e-3, 1e-2], "factored_seconds": [1e-4, 1e-4]})
    fig = psp.svd_speed(timings)
    assert len(fig.axes[0].lines) == 2
    sweep = pd.DataFrame({"method": ["m"] * 2, "rank": [1, 2], "accuracy": [0.5, 0.7]})
    storage = sp.storage_by_rank({"a": torch.zeros(12, 6)}, {"a": _factors(12, 6, SIGMAS)}, [1, 2])
    fig = psp.lora_accuracy_and_storage(sweep, storage, reference={"LoRA": 0.8})
    assert len(fig.axes) == 2 and fig.axes[0].lines[0].get_ydata().tolist() == [50.0, 70.0]
    import matplotlib.pyplot as plt

    plt.close("all")
