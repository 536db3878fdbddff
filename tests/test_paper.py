"""The paper suite's loaders on tiny files written in each real format (no download, tiny CLIP)."""
import gzip
import json
import struct
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import byom_lab as bl
from byom_lab.paper import checkpoints as pc
from byom_lab.paper import data as pd_
from byom_lab.model import open_clip
from byom_lab.paper import load_pretrained, select_tasks

torch.set_num_threads(1)
@pytest.fixture(scope="module")
def clip(small_clip):
    return small_clip.model


@pytest.fixture(scope="module")
def tower(clip):
    return {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}


def perturbed(tower, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in tower.items()}


def hf_forward(hf: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """HF CLIPVisionModelWithProjection.image_embeds, re-derived from transformers' modeling_clip."""
    ln = lambda h, n: torch.nn.functional.layer_norm(h, h.shape[-1:], hf[f"{n}.weight"], hf[f"{n}.bias"], 1e-5)
    lin = lambda h, n: torch.nn.functional.linear(h, hf[f"{n}.weight"], hf[f"{n}.bias"])
    p = hf["vision_model.embeddings.patch_embedding.weight"]
    h = torch.nn.functional.conv2d(x, p, stride=p.shape[-1]).flatten(2).transpose(1, 2)  # (n, tokens, w)
    cls = hf["vision_model.embeddings.class_embedding"].expand(len(x), 1, -1)
    h = torch.cat([cls, h], 1) + hf["vision_model.embeddings.position_embedding.weight"]
    h = ln(h, "vision_model.pre_layrnorm")
    n, t, w = h.shape
    i = 0
    while f"vision_model.encoder.layers.{i}.layer_norm1.weight" in hf:
        pre = f"vision_model.encoder.layers.{i}"
        a = ln(h, f"{pre}.layer_norm1")
        q, k, v = (lin(a, f"{pre}.self_attn.{c}_proj").view(n, t, heads, -1).transpose(1, 2) for c in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v
        h = h + lin(att.transpose(1, 2).reshape(n, t, w), f"{pre}.self_attn.out_proj")
        m = lin(ln(h, f"{pre}.layer_norm2"), f"{pre}.mlp.fc1")
        h = h + lin(m * torch.sigmoid(1.702 * m), f"{pre}.mlp.fc2")  # quick_gelu
        i += 1
    return ln(h[:, 0], "vision_model.post_layernorm") @ hf["visual_projection.weight"].T


# --- checkpoints ------------------------------------------------------------------------------------

def test_hf_conversion_round_trips_exactly(tower):
    hf = pc.open_clip_to_hf(tower)
    assert torch.equal(hf["vision_model.encoder.layers.1.self_attn.k_proj.weight"],
                       tower["transformer.resblocks.1.attn.in_proj_weight"][64:128])
    assert torch.equal(hf["visual_projection.weight"], tower["proj"].T)
    back = pc.hf_to_open_clip(hf)
    assert back.keys() == tower.keys()
    assert all(torch.equal(back[k], tower[k]) for k in tower)


@torch.no_grad()
def test_hf_weights_give_the_open_clip_features(clip, tower):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = hf_forward(pc.open_clip_to_hf(tower), x, heads=2)
    assert torch.allclose(got, clip.visual(x), atol=1e-5)


@torch.no_grad()
def test_transformers_clip_vision_model_matches_open_clip(clip, tower, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = pc.save_hf_folder(tower, tmp_path / "hf", pc.hf_vision_config(clip.visual, quick_gelu=True))
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(pixel_values=x).image_embeds, clip.visual(x), atol=1e-5)


def test_hf_folder_loads_and_fills_missing_projection(clip, tower, tmp_path):
    ft = perturbed(tower, 3)
    folder = pc.save_hf_folder(ft, tmp_path / "hf", pc.hf_vision_config(clip.visual, quick_gelu=True))
    state, fmt = pc.load_checkpoint(folder, tower)
    assert fmt == "hugging face clip folder" and all(torch.equal(state[k], ft[k]) for k in tower)
    hf = pc.open_clip_to_hf(ft)
    del hf["visual_projection.weight"]  # a CLIPVisionModel has no projection ...
    save_file({k.removeprefix("vision_model."): v for k, v in hf.items()}, str(folder / "model.safetensors"))
    state, _ = pc.load_checkpoint(folder, tower)  # ... and transformers 5 saves its keys without vision_model.
    assert torch.equal(state["proj"], tower["proj"]) and torch.equal(state["conv1.weight"], ft["conv1.weight"])


def test_torchscript_archive_like_openai_release(clip, tower, tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.logit_scale = clip.visual, clip.logit_scale

        def forward(self, x):
            return self.visual(x)

    with torch.no_grad():
        torch.jit.trace(Wrapper(), torch.zeros(1, 3, 32, 32), check_trace=False).save(str(tmp_path / "ViT.pt"))
    state, _ = pc.load_checkpoint(tmp_path / "ViT.pt", tower)
    assert all(torch.equal(state[k], tower[k]) for k in tower)


def test_state_dict_files_and_prefixes(tower, tmp_path):
    full = {f"model.visual.{k}": v for k, v in tower.items()} | {"model.logit_scale": torch.tensor(4.6)}
    save_file(full, str(tmp_path / "a.safetensors"))
    torch.save({"state_dict": {f"visual.{k}": v for k, v in tower.items()}}, tmp_path / "b.pt")
    for name in ("a.safetensors", "b.pt"):
        state, _ = pc.load_checkpoint(tmp_path / name, tower)
        assert state.keys() == tower.keys() and all(torch.equal(state[k], tower[k]) for k in tower)


def test_mismatch_names_the_key_and_both_shapes(tower, tmp_path):
    bad = dict(tower, proj=torch.zeros(64, 16))
    with pytest.raises(ValueError, match=r"'proj' has shape \(64, 16\), the model expects \(64, 32\)"):
        pc.image_tower(bad, tower)
    with pytest.raises(ValueError, match="missing image-tower key 'ln_post.bias'"):
        pc.image_tower({k: v for k, v in tower.items() if k != "ln_post.bias"}, tower)


def test_pickled_task_vectors_module_only_with_allow_pickle(tmp_path, tower, small_clip):
    oc = open_clip()
    torch.manual_seed(0)
    enc_model = oc.create_model(small_clip.name)
    delattr(enc_model, "transformer")  # as task-vectors' ImageEncoder(keep_lang=False) does
    encoder_cls = type("ImageEncoder", (torch.nn.Module,), {"__module__": "src.modeling"})
    encoder = encoder_cls()
    encoder.model = enc_model
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    modeling.ImageEncoder = encoder_cls
    with pytest.MonkeyPatch.context() as mp:  # src.modeling exists only while saving, as on the author's side
        mp.setitem(sys.modules, "src", src)
        mp.setitem(sys.modules, "src.modeling", modeling)
        torch.save(encoder, tmp_path / "finetuned.pt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        pc.load_checkpoint(tmp_path / "finetuned.pt", tower)
    state, _ = pc.load_checkpoint(tmp_path / "finetuned.pt", tower, allow_pickle=True)
    assert all(torch.equal(state[k], tower[k]) for k in tower)
    pc.convert_checkpoint(tmp_path / "finetuned.pt", tmp_path / "finetuned.safetensors", allow_pickle=True)
    state, _ = pc.load_checkpoint(tmp_path / "finetuned.safetensors", tower)
    assert all(torch.equal(state[k], tower[k]) for k in tower)


def test_lora_byom_and_peft_formats(tower, tmp_path):
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(256, 4, generator=g), torch.randn(4, 64, generator=g)
    save_file({"transformer.resblocks.0.mlp.c_fc.weight::B": b, "transformer.resblocks.0.mlp.c_fc.weight::A": a},
              str(tmp_path / "MNIST.safetensors"))
    lora = pc.load_lora(tmp_path / "MNIST.safetensors", tower)
    assert torch.equal(lora["transformer.resblocks.0.mlp.c_fc.weight"][0], b)
    peft = tmp_path / "peft"
    peft.mkdir()
    pre = "base_model.model.vision_model.encoder.layers.1"
    f = {m: (torch.randn(64 if m != "mlp.fc1" else 256, 4, generator=g), torch.randn(4, 64, generator=g))
         for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")}
    save_file({f"{pre}.{m}.lora_{w}.weight": t for m, (bb, aa) in f.items() for w, t in (("B", bb), ("A", aa))},
              str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    lora = pc.load_lora(peft, tower)
    b_in, a_in = lora["transformer.resblocks.1.attn.in_proj_weight"]
    delta = b_in @ a_in  # (192, 64): q rows, zero k rows, v rows
    assert torch.allclose(delta[:64], 2 * f["self_attn.q_proj"][0] @ f["self_attn.q_proj"][1])
    assert torch.equal(delta[64:128], torch.zeros(64, 64))
    assert torch.allclose(delta[128:], 2 * f["self_attn.v_proj"][0] @ f["self_attn.v_proj"][1])
    b_fc, a_fc = lora["transformer.resblocks.1.mlp.c_fc.weight"]
    assert torch.allclose(b_fc @ a_fc, 2 * f["mlp.fc1"][0] @ f["mlp.fc1"][1])


# --- pretrained weights -----------------------------------------------------------------------------

def test_weights_from_state_dict_file_and_local_dir(clip, tower, tmp_path, small_clip):
    save_file(clip.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(clip.state_dict(), tmp_path / "w.pt")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "open_clip_config.json").write_text(json.dumps({"model_cfg": small_clip.config}))
    save_file(clip.state_dict(), str(tmp_path / "dir" / "open_clip_model.safetensors"))
    for weights in (tmp_path / "w.safetensors", tmp_path / "w.pt", f"local-dir:{tmp_path / 'dir'}"):
        model, tokenizer, normalize, info = load_pretrained(small_clip.name, weights)
        assert all(torch.equal(model.visual.state_dict()[k], tower[k]) for k in tower), weights
        assert info["quick_gelu"] and tokenizer(["a photo"]).shape == (1, 16)
    mean, std = (torch.tensor(c) for c in (open_clip().OPENAI_DATASET_MEAN, open_clip().OPENAI_DATASET_STD))
    assert torch.allclose(normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).flatten(), (1 - mean) / std)


def test_missing_weights_offline_fail_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("BYOM_LAB_PAPER_WEIGHTS", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.time()
    with pytest.raises(FileNotFoundError, match="ViT-B-32.*HF_HUB_OFFLINE.*BYOM_LAB_PAPER_WEIGHTS"):
        load_pretrained("ViT-B-32")
    assert time.time() - start < 5
    with pytest.raises(FileNotFoundError, match="neither a file"):
        load_pretrained("ViT-B-32", tmp_path / "nope.bin")


# --- datasets ---------------------------------------------------------------------------------------

def write_idx(path, array: np.ndarray, gz=False):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def write_mnist(root, n_train=30, n_test=8):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = np.random.default_rng(0)
    out = {}
    for stem, n, gz in (("train", n_train, False), ("t10k", n_test, True)):
        x, y = g.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(raw / (f"{stem}-images-idx3-ubyte" + ".gz" * gz), x, gz)
        write_idx(raw / (f"{stem}-labels-idx1-ubyte" + ".gz" * gz), y, gz)
        out[stem] = (x, y)
    return out


COLOURS = {"AnnualCrop": (200, 40, 10), "SeaLake": (10, 60, 220)}


def write_image_folder(root, name, splits=("train", "test"), n=4):
    for split in splits:
        for c, colour in COLOURS.items():
            (root / name / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + 8 * i, 48), colour).save(root / name / split / c / f"{i}.png")


def test_mnist_idx_with_carved_validation(tmp_path):
    written = write_mnist(tmp_path)
    data, classes, info = pd_.load_dataset(tmp_path, "MNIST", 32)
    assert classes == pd_.DIGITS and info["layout"] == "mnist-idx"
    tr, va = pd_.carve_val(30)
    assert len(va) == 3 and sorted(tr + va) == list(range(30))
    assert torch.equal(data["val"][1], torch.as_tensor(written["train"][1][va]))
    assert torch.equal(data["test"][1], torch.as_tensor(written["t10k"][1]))
    x = data["train"][0]
    assert x.dtype == torch.uint8 and x.shape == (27, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])  # grey -> RGB


def test_image_folder_splits_names_and_cap(tmp_path):
    write_image_folder(tmp_path, "EuroSAT_splits", ("train", "val", "test"))
    data, classes, info = pd_.load_dataset(tmp_path, "EuroSAT", 32, max_images=5)
    assert classes == ["annual crop land", "lake or sea"] and info["val"] == "folder"
    x, y = data["test"]
    assert x.shape == (5, 3, 32, 32) and info["sizes"]["test"] == "5 of 8"
    for img, label in zip(x, y):  # solid colours survive resize + centre crop
        assert torch.all(img == torch.tensor(list(COLOURS.values())[label], dtype=torch.uint8).view(3, 1, 1))


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    (tmp_path / "svhn").mkdir()
    g = np.random.default_rng(1)
    for split in ("train", "test"):
        x = g.integers(0, 256, (32, 32, 3, 20)).astype(np.uint8)
        savemat(str(tmp_path / "svhn" / f"{split}_32x32.mat"), {"X": x, "y": (np.arange(20) % 10 + 1)[:, None]})
    data, _, _ = pd_.load_dataset(tmp_path, "SVHN", 32)
    assert torch.equal(data["test"][0][0], torch.from_numpy(x[..., 0].transpose(2, 0, 1).copy()))
    assert data["test"][1][:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def write_cars_devkit(root, names, n_train=12, n_test=6):
    """torchvision's Stanford Cars layout: jpgs named by number, 1-based classes in struct-array .mat files."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": np.array(names, dtype=object)})
    colours = list(COLOURS.values())
    for split, n, annos in (("train", n_train, base / "devkit" / "cars_train_annos.mat"),
                            ("test", n_test, base / "cars_test_annos_withlabels.mat")):
        (base / f"cars_{split}").mkdir()
        rows = np.zeros(n, dtype=[("fname", object), ("class", object)])
        for i in range(n):
            label = (3 * i + (split == "test")) % len(names)
            rows[i] = (f"{i + 1:05d}.jpg", label + 1)
            Image.new("RGB", (40, 30), tuple(colours[label % len(colours)])).save(base / f"cars_{split}" / f"{i + 1:05d}.jpg")
        savemat(str(annos), {"annotations": rows})
    return base


def test_cars_devkit_matches_torchvision(tmp_path):
    from torchvision.datasets import StanfordCars

    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    write_cars_devkit(tmp_path, names)
    reader, folder, layout = pd_.find_dataset(tmp_path, "Cars")
    assert layout == "cars-devkit"
    splits, classes = reader(folder)
    for split in ("train", "test"):
        ours = [(str(path), int(label)) for path, label in zip(*splits[split])]
        theirs = StanfordCars(str(tmp_path), split=split)
        assert ours == [(str(path), int(label)) for path, label in theirs._samples]
        assert classes == theirs.classes
    data, class_names, info = pd_.load_dataset(tmp_path, "Cars", 16)
    assert class_names == names and info["val"].startswith("carved")
    assert data["test"][1].tolist() == [(3 * i + 1) % 3 for i in range(6)]


def test_cars_devkit_class_ids_outside_the_meta_are_an_error(tmp_path):
    base = write_cars_devkit(tmp_path, ["a", "b", "c"])
    from scipy.io import savemat

    rows = np.zeros(1, dtype=[("fname", object), ("class", object)])
    rows[0] = ("00001.jpg", 7)
    savemat(str(base / "cars_test_annos_withlabels.mat"), {"annotations": rows})
    with pytest.raises(ValueError, match=r"class ids 7..7 outside 1..3"):
        pd_.load_dataset(tmp_path, "Cars", 16)


def test_bad_names_and_missing_folders_are_explained(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'CIFAR10'.*SUN397"):
        select_tasks(["CIFAR10"])
    with pytest.raises(FileNotFoundError, match=r"dataset DTD not found.*dtd holding .*train,val,test"):
        pd_.find_dataset(tmp_path, "DTD")


# --- the whole suite --------------------------------------------------------------------------------

def test_load_paper_suite_end_to_end(clip, tower, tmp_path, monkeypatch, small_clip):
    data = tmp_path / "data"
    write_mnist(data)
    write_image_folder(data, "EuroSAT")
    save_file(clip.state_dict(), str(tmp_path / "weights.safetensors"))
    ck = tmp_path / "ckpt" / small_clip.name
    (ck / "MNIST").mkdir(parents=True)
    ft = [perturbed(tower, 1), perturbed(tower, 2)]
    save_file({f"model.visual.{k}": v for k, v in ft[0].items()}, str(ck / "MNIST" / "finetuned.safetensors"))
    pc.save_hf_folder(ft[1], ck / "EuroSAT", pc.hf_vision_config(clip.visual, quick_gelu=True))
    torch.save({f"model.visual.{k}": v for k, v in tower.items()}, ck / "zeroshot.pt")
    save_file({"proj::B": torch.ones(64, 2), "proj::A": torch.ones(2, 32)}, str(tmp_path / "MNIST.safetensors"))
    save_file({"proj::B": torch.zeros(64, 2), "proj::A": torch.ones(2, 32)}, str(tmp_path / "EuroSAT.safetensors"))
    monkeypatch.setenv("BYOM_LAB_PAPER_DATA", str(data))
    suite = bl.load_suite("paper", tasks=["MNIST", "EuroSAT"], model=small_clip.name, weights=tmp_path / "weights.safetensors",
                       checkpoints=tmp_path / "ckpt", lora_checkpoints=tmp_path, max_images=12)
    assert suite.name == "paper" and suite.tasks == ["MNIST", "EuroSAT"]
    assert all(torch.equal(suite.finetuned[t][k], ft[t][k]) for t in range(2) for k in tower)
    assert suite.info["checkpoint_formats"]["EuroSAT"] == "hugging face clip folder"
    assert suite.info["zeroshot_max_abs_diff"] == 0.0
    assert torch.equal(suite.lora[0]["proj"][0], torch.ones(64, 2)) and len(suite.lora) == 2
    assert suite.classes[1] == ["annual crop land", "lake or sea"] and suite.heads[1].shape == (2, 32)
    assert {s: len(suite.data["MNIST"][s][1]) for s in ("train", "val", "test")} == {"train": 12, "val": 3, "test": 8}
    assert suite.data["EuroSAT"]["val"][0].shape == (1, 3, 32, 32) and len(suite.data["EuroSAT"]["train"][1]) == 7
    table = bl.evaluate(suite, suite.finetuned)
    assert list(table.task) == ["MNIST", "EuroSAT"]
    assert ((table.normalized_accuracy == 1.0) | (table.accuracy == 0)).all()
    assert bl.evaluate(suite, suite.pretrained, split="val").accuracy.between(0, 1).all()
    config = ck / "EuroSAT" / "config.json"
    config.write_text(config.read_text().replace('"quick_gelu"', '"gelu"'))
    with pytest.warns(UserWarning, match="hidden_act='gelu' but the model uses QuickGELU"):
        bl.load_suite("paper", tasks=["EuroSAT"], model=small_clip.name, weights=tmp_path / "weights.safetensors",
                   checkpoints=tmp_path / "ckpt", max_images=2)
    with pytest.raises(ValueError, match="image_size=64"):
        bl.load_suite("paper", tasks=["MNIST"], model=small_clip.name, weights=tmp_path / "weights.safetensors",
                   checkpoints=tmp_path / "ckpt", image_size=64)
    write_image_folder(data, "DTD")
    with pytest.raises(FileNotFoundError, match="no fine-tuned checkpoint for task DTD"):
        bl.load_suite("paper", tasks=["DTD"], model=small_clip.name, checkpoints=tmp_path / "ckpt")
