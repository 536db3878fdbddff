"""The methods that use data: Fisher, RegMean, TALL masks / Consensus, AdaMerging, Model Tinting."""
import math
from dataclasses import replace

import pytest
import torch

import byom_lab as bl
from byom_lab import adaptation as A
from byom_lab import forward
from byom_lab import merging as M
from byom_lab.adaptation.statistics import diagonal_fisher, layer_inputs
from byom_lab.memo import state_digest

# ---------------------------------------------------------------- Fisher


def test_fisher_of_a_two_parameter_model_by_hand():
    # logits = (a·x, b·x); per batch g = ∇ Σ_c sqrt(p_c) log p_c with p detached
    a, b = 0.7, -0.4
    params = {"a": torch.tensor(a, requires_grad=True), "b": torch.tensor(b, requires_grad=True)}
    xs = [torch.tensor([1.5]), torch.tensor([-2.0])]  # two batches of one image
    got = diagonal_fisher(lambda p, x: torch.stack([p["a"] * x, p["b"] * x], -1), params, xs)
    expected = {"a": 0.0, "b": 0.0}
    for x in (1.5, -2.0):
        z0, z1 = math.exp(a * x), math.exp(b * x)
        p0, p1 = z0 / (z0 + z1), z1 / (z0 + z1)
        # ∂ log p_c / ∂a = x (δ_c0 − p0), ∂ log p_c / ∂b = x (δ_c1 − p1)
        ga = x * (math.sqrt(p0) * (1 - p0) - math.sqrt(p1) * p0)
        gb = x * (-math.sqrt(p0) * p1 + math.sqrt(p1) * (1 - p1))
        expected["a"] += ga**2 / 2
        expected["b"] += gb**2 / 2
    assert got["a"].item() == pytest.approx(expected["a"], rel=1e-5)
    assert got["b"].item() == pytest.approx(expected["b"], rel=1e-5)


def test_fisher_merge_by_hand():
    pre = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}]
    F = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([1.0, 0.0])}]  # ‖F‖ = 5 and 1
    eps = 1e-6
    w = torch.tensor([1 / (5 + eps), 1 / (1 + eps)], dtype=torch.float64)
    w = w / w.sum()
    num = w[0] * (F[0]["w"].double() + eps) * fts[0]["w"] + w[1] * (F[1]["w"].double() + eps) * fts[1]["w"]
    den = w[0] * (F[0]["w"].double() + eps) + w[1] * (F[1]["w"].double() + eps)
    got = M.fisher(pre, fts, F)
    assert torch.allclose(got["w"].double(), num / den, atol=1e-6)
    # a parameter only model 0 is sensitive to follows model 0
    assert got["w"][1].item() == pytest.approx(2.0, abs=1e-4)


def test_fisher_errors_name_the_problem():
    pre = {"w": torch.zeros(2), "b": torch.zeros(1)}
    fts = [{"w": torch.ones(2), "b": torch.ones(1)}, {"w": -torch.ones(2), "b": torch.zeros(1)}]
    good = [{"w": torch.ones(2), "b": torch.ones(1)}] * 2
    with pytest.raises(ValueError, match="statistic is missing"):
        M.fisher(pre, fts, good[:1])
    with pytest.raises(ValueError, match="no statistic for 'b'"):
        M.fisher(pre, fts, [good[0], {"w": torch.ones(2)}])
    foreign = M.ModelStatistics("fisher", good[0], model=state_digest(fts[0]))
    M.fisher(pre, fts, [foreign, good[1]])  # its own model: fine
    with pytest.raises(ValueError, match="another model"):
        M.fisher(pre, fts, [good[0], foreign])
    with pytest.raises(ValueError, match="needs fisher statistics"):
        M.fisher(pre, fts, [M.ModelStatistics("gram", good[0]), good[1]])
    with pytest.raises(ValueError, match="negative"):
        M.fisher(pre, fts, [good[0], {"w": -torch.ones(2), "b": torch.ones(1)}])


# ---------------------------------------------------------------- RegMean


def _toy_layer(seed=0, d_in=4, d_out=3, n=50, tasks=3):
    gen = torch.Generator().manual_seed(seed)
    pre = {"lin.weight": torch.randn(d_out, d_in, generator=gen), "lin.bias": torch.randn(d_out, generator=gen)}
    fts = [{k: v + torch.randn(v.shape, generator=gen) for k, v in pre.items()} for _ in range(tasks)]
    xs = [torch.randn(n, d_in, generator=gen) * (1 + t) for t in range(tasks)]  # (N, d_in) inputs per task
    return pre, fts, xs


def test_regmean_is_the_least_squares_fit_of_the_stacked_regressions():
    pre, fts, xs = _toy_layer()
    grams = [{"lin.weight": x.T @ x / len(x)} for x in xs]
    got = M.regmean(pre, fts, grams, alpha=1.0)
    X = torch.cat(xs).double()  # (T·N, d_in)
    Y = torch.cat([x.double() @ ft["lin.weight"].double().T for x, ft in zip(xs, fts)])  # (T·N, d_out)
    W = torch.linalg.lstsq(X, Y).solution  # (d_in, d_out)
    assert torch.allclose(got["lin.weight"].double(), W.T, atol=1e-5)
    assert torch.allclose(got["lin.bias"], torch.stack([f["lin.bias"] for f in fts]).mean(0), atol=1e-6)


def test_regmean_shrinks_off_diagonals_and_reads_inputs_first_weights():
    pre, fts, xs = _toy_layer()
    grams = [{"lin.weight": x.T @ x / len(x)} for x in xs]
    # α = 0 keeps only the diagonals: a per-input-feature weighted average of the weights
    got = M.regmean(pre, fts, grams, alpha=0.0)["lin.weight"]
    d = torch.stack([torch.diagonal(g["lin.weight"]) for g in grams])  # (T, d_in)
    W = torch.stack([f["lin.weight"] for f in fts])  # (T, d_out, d_in)
    assert torch.allclose(got, (d[:, None, :] * W).sum(0) / d.sum(0), atol=1e-5)
    # a weight stored inputs-first (x @ W, open_clip's proj) gives the transposed answer
    pre_t = {"proj": pre["lin.weight"].T.contiguous()}
    fts_t = [{"proj": f["lin.weight"].T.contiguous()} for f in fts]
    got_t = M.regmean(pre_t, fts_t, [{"proj": g["lin.weight"]} for g in grams], alpha=0.5)["proj"]
    assert torch.allclose(got_t.T, M.regmean(pre, fts, grams, alpha=0.5)["lin.weight"], atol=1e-5)


def test_regmean_errors_name_the_problem():
    pre, fts, xs = _toy_layer()
    grams = [{"lin.weight": x.T @ x / len(x)} for x in xs]
    with pytest.raises(ValueError, match="alpha must lie in"):
        M.regmean(pre, fts, grams, alpha=-0.1)
    with pytest.raises(ValueError, match="statistic is missing"):
        M.regmean(pre, fts, grams[:2])
    with pytest.raises(ValueError, match="lacks Gram for 'lin.weight'"):
        M.regmean(pre, fts, [grams[0], {"other": torch.eye(4)}, grams[2]])
    with pytest.raises(ValueError, match="another model"):
        M.regmean(pre, fts, [grams[0], {"lin.weight": torch.eye(7)}, grams[2]])
    stats = [M.ModelStatistics("gram", g, model=state_digest(f)) for g, f in zip(grams, fts)]
    M.regmean(pre, fts, stats)
    with pytest.raises(ValueError, match="another model"):
        M.regmean(pre, fts, stats[::-1])


# ---------------------------------------------------------------- TALL masks and Consensus


def test_tall_mask_by_hand():
    pre = {"w": torch.zeros(4)}
    v1, v2 = torch.tensor([1.0, 0.2, -1.0, 0.0]), torch.tensor([-0.1, 0.5, 1.0, 0.0])
    fts = [{"w": v1}, {"w": v2}]
    tau = v1 + v2  # [0.9, 0.7, 0, 0]
    # m_1 = [|v1| >= 0.5 |tau - v1|]: |v1| = [1, .2, 1, 0], |tau - v1| = |v2| = [.1, .5, 1, 0]
    res = M.tall_masks(pre, fts, lams=[0.5, 0.5])
    assert res.mask(0)["w"].tolist() == [True, False, True, True]
    assert res.mask(1)["w"].tolist() == [False, True, True, True]
    assert torch.allclose(res.task_state_dict(0)["w"], torch.tensor([0.9, 0.0, 0.0, 0.0]))
    assert torch.allclose(res.task_state_dict(1)["w"], torch.tensor([0.0, 0.7, 0.0, 0.0]))
    # a larger λ_t asks more of a task: 0.2 >= 2·0.5 fails, 1 >= 2·0.1 holds
    assert M.tall_masks(pre, fts, lams=[2.0, 0.5]).mask(0)["w"].tolist() == [True, False, False, True]
    # α scales the masked τ
    assert torch.allclose(M.tall_masks(pre, fts, lams=0.5, alpha=2.0).task_state_dict(0)["w"], torch.tensor([1.8, 0, 0, 0]))
    # one bit per parameter per task
    assert res.nbytes() == 1 and res.num_params() == 1
    # Consensus keeps entries active in >= 2 masks: only entries 2 and 3, where τ is 0
    assert torch.allclose(M.consensus(pre, fts, lams=0.5, k=2, lam=1.0)["w"], torch.zeros(4))
    assert torch.allclose(M.consensus(pre, fts, lams=0.5, k=1, lam=0.5)["w"], 0.5 * tau)


def test_tall_masks_on_ties_and_errors():
    pre = {"w": torch.zeros(5)}
    fts = [{"w": torch.tensor([1.0, -2.0, 0.1, 0.3, 0.0])}, {"w": torch.tensor([2.0, 1.0, -0.2, 0.1, 0.5])}]
    tau = M.tall.multitask_vector(pre, fts, "ties", density=0.4)
    # top-40% per task keeps |.| >= the 2nd largest: task 0 keeps 1, -2; task 1 keeps 2, 1; γ = sign(sum)
    assert torch.allclose(tau["w"], torch.tensor([3.0, -2.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        M.tall_masks(pre, fts, alpha=-1.0)
    with pytest.raises(ValueError, match="3 TALL λ_t for 2 tasks"):
        M.tall_masks(pre, fts, lams=[0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="base must be one of"):
        M.tall_masks(pre, fts, base="dare")


def test_every_method_is_registered_with_what_it_needs():
    from byom_lab.merging.registry import method_inputs

    for name, inputs in [("fisher", "statistics"), ("regmean", "statistics"), ("tall_masks", "finetuned"),
                         ("consensus", "finetuned"), ("adamerging", "test images"), ("adamerging_plus", "test images"),
                         ("tinting", "test images"), ("tinting_plus", "test images")]:
        assert name in bl.list_methods()
        assert method_inputs(name) == inputs
    assert "fisher" not in bl.list_methods(inputs=("finetuned", "lora"))


# ---------------------------------------------------------------- test-time adaptation: pure pieces


def test_tinting_plus_empty_selection_gives_no_nan():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]], requires_grad=True)  # the merged model: sure of 0, then 1
    labels = torch.tensor([1, 0])  # the individual model disagrees everywhere ...
    confidence = torch.tensor([0.6, 0.6])  # ... and is less sure
    loss, kept = A.tinting_loss(logits, labels, confidence, plus=True)
    assert kept == 0 and torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    loss, kept = A.tinting_loss(logits, labels, torch.tensor([0.99999, 0.1]), plus=True)
    assert kept == 1 and torch.isfinite(loss) and loss.item() > 1  # the confident individual label counts
    assert A.tinting_loss(logits, labels, confidence, plus=False)[1] == 2


def test_task_vector_stack_builds_theta_of_lambda():
    pre = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    vecs = [{"a": torch.ones(3), "b": torch.ones(2, 2)}, {"a": 2 * torch.ones(3), "b": -torch.ones(2, 2)}]
    stack = A.TaskVectorStack(pre, vecs)
    lam = torch.tensor([[0.5, 0.25], [1.0, 0.0]], requires_grad=True)  # (tensors, tasks)
    sd = stack.weights(lam)
    assert torch.allclose(sd["a"], torch.full((3,), 1.0)) and torch.allclose(sd["b"], torch.full((2, 2), 2.0))
    sd["a"].sum().backward()
    assert lam.grad.tolist() == [[3.0, 6.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="shape"):
        stack.weights(torch.zeros(3, 2))


def test_zero_steps_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        A.AdaMergingConfig(steps=0)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        A.TintingConfig(epochs=0)
    with pytest.raises(ValueError, match="granularity"):
        A.AdaMergingConfig(granularity="block")
    with pytest.raises(ValueError, match="init"):
        A.AdaMergingConfig(init=1.5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        replace(A.AdaMergingConfig(), steps=-3)


# ---------------------------------------------------------------- on the reduced suite


def test_statistics_come_from_each_model_and_are_cached(reduced):
    suite, _ = reduced
    fishers = A.fisher_statistics(suite, images=32, batch_size=16)
    assert [f.model for f in fishers] == [state_digest(m) for m in suite.finetuned]
    assert fishers[0].images == 32 and set(fishers[0].tensors) == set(suite.pretrained)
    assert all(bool((v >= 0).all()) for v in fishers[0].tensors.values())
    again = A.fisher_statistics(suite, images=32, batch_size=16)  # read back from the cache
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for a, b in zip(fishers, again) for k in a.tensors)
    grams = A.gram_statistics(suite, images=32)
    g = grams[0].tensors
    assert g["transformer.resblocks.0.attn.in_proj_weight"].shape == (256, 256)
    assert g["transformer.resblocks.0.mlp.c_proj.weight"].shape == (1024, 1024)
    assert torch.allclose(g["proj"], g["proj"].T, atol=1e-6)  # a Gram is symmetric
    for merged in (M.regmean(suite.pretrained, suite.finetuned, grams), M.fisher(suite.pretrained, suite.finetuned, fishers)):
        assert 0 <= bl.evaluation.accuracy(suite, merged, 0, "val", limit=64) <= 1
    with pytest.raises(ValueError, match="another model"):
        M.fisher(suite.pretrained, suite.finetuned, fishers[::-1])


def test_recorded_layer_inputs_reproduce_the_forward(reduced):
    suite, _ = reduced
    x = suite.inputs(0, "val")[0][:8]
    sd = suite.finetuned[0]
    seen = layer_inputs(suite.visual, sd, x)
    assert torch.allclose(seen["proj"] @ sd["proj"], forward.image_features(suite.visual, sd, x), atol=1e-4)
    assert seen["transformer.resblocks.0.attn.in_proj_weight"].shape[0] == 8 * 17  # every token of every image


def test_adamerging_clamps_lambda_and_lowers_entropy(reduced):
    suite, _ = reduced
    res = A.adamerging(suite, granularity="task", steps=3, lr=5.0, init=0.3, part="first_half")
    assert res.lambdas.min() >= 0 and res.lambdas.max() <= 1  # a huge step is clamped
    vecs = M.task_vectors(suite.pretrained, suite.finetuned)
    k = "transformer.resblocks.0.attn.in_proj_weight"
    expected = suite.pretrained[k] + sum(res.lambdas[0, t] * v[k] for t, v in enumerate(vecs))
    assert torch.allclose(res.merged[k], expected, atol=1e-6)
    assert res.info["images"] == 2 * 250 and res.info["steps"] == 3 and res.num_params() == 0

    def mean_entropy(sd):
        with torch.no_grad():
            return sum(float(A.entropy(suite.logit_scale * A.features(suite.visual, sd, A.adaptation_images(suite, t, "first_half")[:64])
                                       @ suite.heads[t].T).mean()) for t in range(2))

    start = mean_entropy(M.task_arithmetic(suite.pretrained, suite.finetuned, lam=0.3))
    run = A.adamerging(suite, granularity="layer", steps=6, lr=0.05, init=0.3, part="first_half")
    assert mean_entropy(run.merged) < start
    assert 0 <= bl.evaluation.accuracy(suite, run.merged, 1, "val", limit=64) <= 1


def test_tinting_lowers_its_loss_and_hands_its_heads_to_evaluate(reduced):
    suite, _ = reduced
    images = [A.adaptation_images(suite, t, "first_half")[:64] for t in range(2)]
    targets = [A.pseudo_labels(suite, t, x)[0] for t, x in enumerate(images)]

    def loss(sd, heads):
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(A.features(suite.visual, sd, x) @ h.T, y))
                       for x, y, h in zip(images, targets, heads))

    start = loss(M.task_arithmetic(suite.pretrained, suite.finetuned, lam=0.3), [suite.logit_scale * h for h in suite.heads])
    res = A.tinting(suite, epochs=4, part="first_half")
    assert loss(res.merged, res.heads) < start
    assert res.info["steps"] == 8 and res.task_head(0).shape == suite.heads[0].shape
    assert res.num_params() == suite.heads[0].numel() + len(suite.pretrained)
    ev = bl.evaluate(suite, res, "val")  # task t scored with res.task_head(t)
    own = [bl.evaluation.accuracy(suite, res.merged, t, "val", head=res.task_head(t)) for t in range(2)]
    assert ev["accuracy"].tolist() == pytest.approx(own)
    plus = A.tinting_plus(suite, epochs=2, part="first_half")
    assert plus.info["steps"] + plus.info["skipped_steps"] == 4
    assert all(math.isfinite(v) for v in plus.history)


def test_accounting_of_data_free_rows_and_the_held_out_half(reduced, monkeypatch):
    from byom_lab.adaptation import report
    from byom_lab.adaptation.report import data_free_accounting, held_out_half

    suite, _ = reduced
    monkeypatch.setattr(report, "select_lambda", lambda suite: (0.3, {}))  # the λ sweep is selection.py's, tested there
    labels = ["zero-shot (pretrained)", "task arithmetic", "BYOM-FFT m=10%", "not a row we know"]
    acc = data_free_accounting(suite, labels)
    assert list(acc.index) == labels[:3]
    assert acc.loc["zero-shot (pretrained)", "data"] == "none"
    assert acc.loc["task arithmetic", "data"].startswith("val labels: 600 images")
    assert (acc["steps"] == 0).all() and (acc["seconds"] >= 0).all()
    half, norm = held_out_half(suite, suite.finetuned)
    assert norm == pytest.approx(100.0)  # the individual models are their own reference
    pred = [bl.evaluation.predictions(suite, suite.pretrained, t, "test") for t in range(2)]
    expected = sum(float((p[250:] == y[250:]).float().mean()) for p, y in pred) / 2
    assert held_out_half(suite, suite.pretrained)[0] == pytest.approx(100 * expected)


def test_tinting_heads_only_keeps_lambda_and_trains_the_heads(reduced):
    suite, _ = reduced
    res = A.tinting(suite, epochs=3, train_lambdas=False, part="first_half")
    assert torch.all(res.lambdas == 0.3)
    ta = M.task_arithmetic(suite.pretrained, suite.finetuned, lam=0.3)
    assert all(torch.allclose(res.merged[k], ta[k], atol=1e-6) for k in ta)
    assert not torch.allclose(res.task_head(0), suite.logit_scale * suite.heads[0])
    assert res.info["steps"] == 6 and len(res.history) == 6


def test_tall_and_tinting_results_save_and_load(tmp_path):
    pre = {"w": torch.zeros(6), "b": torch.ones(2)}
    fts = [{"w": torch.randn(6, generator=torch.Generator().manual_seed(t)), "b": torch.ones(2) * t} for t in range(3)]
    tall = M.tall_masks(pre, fts, lams=[0.2, 0.4, 0.6])
    back = M.load_result(tall.save(tmp_path / "tall"))
    assert all(torch.equal(back.task_state_dict(t)[k], tall.task_state_dict(t)[k]) for t in range(3) for k in pre)
    assert back.nbytes() == tall.nbytes() and back.hyperparameters["lams"] == [0.2, 0.4, 0.6]
    lam = torch.rand(2, 3)
    tint = A.TintingResult(dict(pre), lam, list(pre), [0.5, 0.25], {"steps": 2}, heads=[torch.randn(4, 5) for _ in range(3)])
    back = M.load_result(tint.save(tmp_path / "tint"))
    assert torch.equal(back.lambdas, lam) and all(torch.equal(back.task_head(t), tint.task_head(t)) for t in range(3))
    assert back.history == [0.5, 0.25] and back.info == {"steps": 2} and back.nbytes() == tint.nbytes()
