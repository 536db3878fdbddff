"""Lesson 08's helpers: a suite's checkpoints written in every format read back exactly, bytes of BYOM files on
disk split by part and equal to their formulas, and the figures drawn from them."""
import json
import types

import matplotlib
import pytest
import torch

from byom_lab import merging
from byom_lab import plots
from byom_lab.analysis import files
from byom_lab.model import open_clip
from byom_lab.paper import checkpoints as pc

ADAPTED = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@pytest.fixture(scope="module")
def suite():
    """A suite-shaped namespace: a tiny open_clip tower, 3 fine-tuned towers and rank-2 LoRA factors."""
    open_clip()  # imports open_clip the way byom_lab does
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    pre = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in pre.items()} for _ in range(3)]
    lora = [{f"transformer.resblocks.{i}.{name}": (torch.randn(pre[f"transformer.resblocks.{i}.{name}"].shape[0], 2,
                                                               generator=gen),
                                                   torch.randn(2, pre[f"transformer.resblocks.{i}.{name}"].shape[1],
                                                               generator=gen))
             for i in range(2) for name in ADAPTED} for _ in range(3)]
    return types.SimpleNamespace(tasks=["a", "b", "c"], pretrained=pre, finetuned=fts, lora=lora, visual=visual)


def same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_every_format_written_reads_back_exactly(suite, tmp_path):
    listing = files.write_checkpoints(suite, tmp_path, formats=["hf_clip", "open_clip", "safetensors"])
    assert list(listing.path) == ["base.safetensors", "a", "b.safetensors", "c.safetensors", "lora/a", "lora/b",
                                  "lora/c"]
    assert list(listing.format) == ["safetensors", "hf_clip", "open_clip", "safetensors", "peft", "peft", "peft"]
    assert all(files.path_bytes(tmp_path / p) == b for p, b in zip(listing.path, listing.bytes))
    base = pc.read_state_dict(tmp_path / "base.safetensors")
    assert same(base, suite.pretrained)
    read = [pc.load_checkpoint(tmp_path / p, base) for p in listing.path[1:4]]
    assert [fmt for _, fmt in read] == ["hugging face clip folder", "safetensors state dict", "safetensors state dict"]
    assert all(same(state, ft) for (state, _), ft in zip(read, suite.finetuned))
    assert json.loads((tmp_path / "a" / "config.json").read_text())["hidden_size"] == 32
    for t, task in enumerate(suite.tasks):
        back = pc.load_lora(tmp_path / "lora" / task, base)
        assert back.keys() == suite.lora[t].keys()
        for key, (b, a) in suite.lora[t].items():
            assert torch.allclose(back[key][0] @ back[key][1], b @ a, atol=1e-6)


def test_peft_adapter_splits_in_proj_and_stores_b_unscaled(suite, tmp_path):
    lora = suite.lora[0]
    files.save_peft_adapter(lora, tmp_path / "peft", lora_alpha=8)  # r = 2: peft's scaling is 4
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 8.0)
    assert config["target_modules"] == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    stored = pc.read_state_dict(tmp_path / "peft" / "adapter_model.safetensors")
    b, a = lora["transformer.resblocks.1.attn.in_proj_weight"]
    key = "base_model.model.vision_model.encoder.layers.1.self_attn.k_proj"
    assert torch.equal(stored[f"{key}.lora_B.weight"], b[32:64] / 4) and torch.equal(stored[f"{key}.lora_A.weight"], a)
    back = pc.load_lora(tmp_path / "peft", suite.pretrained)
    assert torch.equal(back["transformer.resblocks.1.mlp.c_fc.weight"][0], lora["transformer.resblocks.1.mlp.c_fc.weight"][0])
    with pytest.raises(ValueError, match="one rank r"):
        files.save_peft_adapter({**lora, "transformer.resblocks.0.mlp.c_fc.weight": (torch.ones(64, 3), torch.ones(3, 32))},
                                tmp_path / "bad")
    with pytest.raises(ValueError, match="no HF CLIP module holds the LoRA of 'proj'"):
        files.save_peft_adapter({"proj": (torch.ones(32, 2), torch.ones(2, 16))}, tmp_path / "bad2")


def test_unknown_format_is_named(suite, tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        files.write_tower(suite.pretrained, "onnx", tmp_path / "x")


def test_stored_bytes_add_up_and_split_into_indices_values_and_factors(suite, tmp_path):
    fft = merging.byom_fft(suite.pretrained, suite.finetuned, density=0.2, lam=0.5)
    out = fft.save(tmp_path / "fft", tasks=suite.tasks)
    parts = files.stored_bytes(out)
    assert parts["bytes"].sum() == files.path_bytes(out)
    for t, task in enumerate(suite.tasks):
        mine = parts[parts.task == task].set_index("part")["bytes"]
        assert mine["indices"] == mine["values"] == 4 * fft.num_params(t)  # int32 index + float32 value
        assert mine["indices"] + mine["values"] == fft.nbytes(t)
    shared = parts[parts.file == "shared.safetensors"].set_index("part")["bytes"]
    assert shared["shared model"] == 4 * sum(v.numel() for v in suite.pretrained.values())
    lora = merging.byom_lora(suite.pretrained, suite.lora, rank=1).save(tmp_path / "lora", tasks=suite.tasks)
    usv = files.stored_bytes(lora).query("part == 'U, S, V'")["bytes"]
    shapes = files.lora_shapes(suite.pretrained, suite.lora[0])
    assert list(usv) == [4 * sum(d_out + d_in + 1 for d_out, d_in in shapes)] * 3


def test_tensor_bytes_reads_the_header(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3, 5), "i": torch.zeros(7, dtype=torch.int32)}, str(tmp_path / "f.safetensors"))
    table = files.tensor_bytes(tmp_path / "f.safetensors").set_index("key")
    assert table.loc["x", "bytes"] == 60 and table.loc["i", "bytes"] == 28 and table.loc["x", "shape"] == (3, 5)
    assert table["bytes"].sum() == (tmp_path / "f.safetensors").stat().st_size


def test_storage_sweep_measures_what_the_formulas_say(suite, tmp_path):
    sweep = files.storage_sweep(suite.pretrained, suite.finetuned, suite.lora, tmp_path, densities=(0.1, 0.4),
                                ranks=(1, 2), tasks=suite.tasks, lam=0.5)
    assert list(sweep.method) == ["byom_fft"] * 2 + ["byom_lora"] * 2 and list(sweep.setting) == [0.1, 0.4, 1, 2]
    assert (sweep.task_bytes == sweep.formula_bytes).all()
    assert (sweep.task_file_bytes > sweep.task_bytes).all()  # the header
    n = sum(v.numel() for v in suite.pretrained.values())
    fft = sweep[sweep.method == "byom_fft"]
    assert all(abs(b - 8 * d * n) <= 0.001 * 8 * d * n for b, d in zip(fft.formula_bytes, (0.1, 0.4)))  # ties
    assert fft.ratio.iloc[1] > fft.ratio.iloc[0] > 1 / 3  # 1/T + 2m, plus headers
    assert abs(fft.ratio.iloc[1] - (1 / 3 + 2 * 0.4)) < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["byom_fft-0.1", "byom_fft-0.4", "byom_lora-1", "byom_lora-2"]


def test_where_bytes_go_counts_checkpoints_and_results(suite, tmp_path):
    listing = files.write_checkpoints(suite, tmp_path / "ckpt", formats=["safetensors"])
    out = merging.byom_fft(suite.pretrained, suite.finetuned, density=0.1).save(tmp_path / "r", tasks=suite.tasks)
    parts = files.where_bytes_go({"every model": listing[listing.kind == "full"], "BYOM-FFT": out})
    every = parts[parts.store == "every model"].set_index("part")["bytes"]
    assert every["full models"] == 3 * every["shared model"]
    assert set(parts[parts.store == "BYOM-FFT"].part) == {"manifest", "shared model", "indices", "values", "headers"}
    assert parts[parts.store == "BYOM-FFT"]["bytes"].sum() == files.path_bytes(out)


def test_flipped_byte_is_caught_by_the_manifest(suite, tmp_path):
    from safetensors.torch import load_file

    out = merging.byom_fft(suite.pretrained, suite.finetuned, density=0.1).save(tmp_path / "r", tasks=suite.tasks)
    task = out / "tasks" / "b.safetensors"
    before = task.read_bytes()
    offset = files.flip_byte(task)
    after = task.read_bytes()
    assert offset == len(before) - 1 and after[:-1] == before[:-1] and after[-1] == before[-1] ^ 1
    with pytest.raises(ValueError, match="b.safetensors does not match its sha256"):
        merging.load_result(out)
    assert files.relative(f"{out}/tasks/b.safetensors is bad", tmp_path) == "r/tasks/b.safetensors is bad"
    task.write_bytes(before)
    good = {k: v.clone() for k, v in load_file(task).items()}  # load_file may map the file: copy first
    key = "transformer.resblocks.1.mlp.c_fc.weight::values"
    files.flip_byte(task, key=key)  # the top byte of the tensor's last float32: one exponent bit
    bad = load_file(task)
    assert [k for k in good if not torch.equal(good[k], bad[k])] == [key]
    assert float(bad[key][-1] / good[key][-1]) in (4.0, 0.25)
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        files.flip_byte(task, key="nope")


def test_hf_key_pairs_split_in_proj(suite):
    pairs = files.hf_key_pairs(list(suite.pretrained))
    assert len(pairs) == len(suite.pretrained) + 2 * 2 * 2  # in_proj weight and bias of 2 blocks: 3 keys each
    by_key = pairs.groupby("open_clip")["hf_clip"].apply(list)
    assert by_key["proj"] == ["visual_projection.weight"]
    assert by_key["transformer.resblocks.0.attn.in_proj_weight"] == [
        f"vision_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]


def test_figures(suite, tmp_path):
    matplotlib.use("Agg")
    sweep = files.storage_sweep(suite.pretrained, suite.finetuned, suite.lora, tmp_path, densities=(0.1, 0.2),
                                ranks=(1,), tasks=suite.tasks)
    fig = plots.bytes_per_task(sweep, model_bytes=sweep.shared_bytes.iloc[0])
    left, right = fig.axes
    assert len(left.lines) == 4 and len(right.lines) == 4  # formula, tensors, files, one model
    assert list(left.lines[1].get_xdata()) == [10, 20] and left.get_yscale() == "log"
    parts = files.where_bytes_go({"BYOM-FFT m=10%": tmp_path / "byom_fft-0.1", "BYOM-LoRA q=1": tmp_path / "byom_lora-1"})
    fig = plots.where_bytes_go(parts)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["BYOM-FFT m=10%", "BYOM-LoRA q=1"]
    labels = ax.get_legend_handles_labels()[1]
    assert labels[0] == "shared model" and "indices" in labels and "U, S, V" in labels
    total = sum(p.get_width() for p in ax.patches if abs(p.get_y() + p.get_height() / 2) < 1e-9)
    assert abs(total - files.path_bytes(tmp_path / "byom_fft-0.1") / 1e6) < 1e-9


def test_data_sha256_ignores_the_header_and_max_abs_difference_reads_lora(tmp_path):
    from safetensors.torch import save_file

    x = {"a": torch.arange(6.0), "b": torch.ones(2, 2)}
    save_file(x, str(tmp_path / "1.safetensors"))
    save_file(x, str(tmp_path / "2.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "1.safetensors").read_bytes() != (tmp_path / "2.safetensors").read_bytes()
    assert files.data_sha256(tmp_path / "1.safetensors") == files.data_sha256(tmp_path / "2.safetensors")
    save_file({**x, "b": torch.zeros(2, 2)}, str(tmp_path / "3.safetensors"))
    assert files.data_sha256(tmp_path / "3.safetensors") != files.data_sha256(tmp_path / "1.safetensors")
    assert files.max_abs_difference(x, {**x, "b": torch.full((2, 2), 1.5)}) == 0.5
    b, a = torch.ones(3, 1), torch.ones(1, 2)
    assert files.max_abs_difference({"w": (b, a)}, {"w": (torch.cat([b, 0 * b], 1), torch.cat([a, a]))}) == 0.0
    with pytest.raises(ValueError, match="different keys"):
        files.max_abs_difference(x, {"a": x["a"]})
