"""Checkpoint files of the paper suite: reading, image-tower keys, HF CLIP <-> open_clip, LoRA.

Formats read (each reduced to open_clip image-tower keys, those of `model.visual.state_dict()`):
- safetensors files; `.pt`/`.bin`/`.pth` state dicts (`torch.load(weights_only=True)`); OpenAI's
  TorchScript archives (`torch.jit.load`, no pickled Python objects);
- whole pickled modules (the task-vectors release's `ImageEncoder`), only with `allow_pickle=True`:
  classes that cannot be imported (e.g. task-vectors' `src.modeling`) are replaced by stubs;
- Hugging Face `CLIPVisionModel`, `CLIPVisionModelWithProjection` or `CLIPModel` folders
  (`config.json` + `model.safetensors`; keys `vision_model.*`, or bare `embeddings.*`, `encoder.*` as
  transformers 5 saves a CLIPVisionModel), converted with `hf_to_open_clip`;
- LoRA: byom-lab's `{name}::B` / `{name}::A` safetensors, or peft adapters (`adapter_config.json` +
  `adapter_model.safetensors`, `lora_A`/`lora_B` on HF CLIP `q/k/v/out_proj`, `fc1`, `fc2` or on
  open_clip `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`); q/k/v adapters become one block LoRA of
  `attn.in_proj_weight`, peft's scaling (lora_alpha / r, or / sqrt(r) with rslora) is folded into B.
"""
import json
import math
import pickle
import re
import types
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOWER_PREFIXES = ("module.model.visual.", "image_encoder.model.visual.", "model.visual.", "visual.")
_HF_GLOBAL = [("embeddings.class_embedding", "class_embedding"),
              ("embeddings.patch_embedding.weight", "conv1.weight"),
              ("embeddings.position_embedding.weight", "positional_embedding")] + [
    (f"{hf}.{w}", f"{oc}.{w}") for hf, oc in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post"))
    for w in ("weight", "bias")]
_HF_LAYER = [(f"{hf}.{w}", f"{oc}.{w}") for hf, oc in (
    ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")) for w in ("weight", "bias")]
_HF_IGNORED = ("vision_model.embeddings.position_ids",)


class _StubModule(torch.nn.Module):
    """Stands in for a pickled class that cannot be imported; keeps its state (tensors, submodules)."""


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:  # pickle's own lookup maps protocol-2 names such as __builtin__.set
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StubModule,), {"__module__": module})


_lenient_pickle = types.SimpleNamespace(
    __name__="byom_lab_lenient_pickle", Unpickler=_LenientUnpickler,
    load=lambda f, **kw: _LenientUnpickler(f, **kw).load())


def _refuse_pickle(path, err):
    return ValueError(
        f"{path} holds pickled Python objects (the task-vectors release saves whole `ImageEncoder` "
        f"modules), not a plain state dict; unpickling runs code from the file, so it is refused by "
        f"default ({type(err).__name__}: {str(err).splitlines()[0]}). If you trust the file, pass "
        f"allow_pickle=True, or convert it once to safetensors with "
        f"byom_lab.paper.checkpoints.convert_checkpoint(src, dst, allow_pickle=True)")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def read_state_dict(path, allow_pickle: bool = False) -> dict:
    """Every tensor of a checkpoint file, by key (any of the file formats in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if _is_torchscript(path):
        obj = torch.jit.load(str(path), map_location="cpu")  # OpenAI's release: no pickled Python objects
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not allow_pickle:
                raise _refuse_pickle(path, e) from None
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if hasattr(obj, "state_dict"):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or module")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


_HF_BARE = ("embeddings.", "encoder.layers.", "pre_layrnorm.", "post_layernorm.")  # transformers 5 CLIPVisionModel


def is_hf_state_dict(state: dict) -> bool:
    return any(k.startswith(("vision_model.",) + _HF_BARE) for k in state)


def hf_to_open_clip(hf: dict) -> dict:
    """HF CLIP vision keys (vision_model.*, visual_projection.weight) -> open_clip image-tower keys."""
    glob, layer = dict(_HF_GLOBAL), dict(_HF_LAYER)
    out, qkv = {}, {}
    hf = {("vision_model." + k if k.startswith(_HF_BARE) else k): v for k, v in hf.items()}
    for key, v in hf.items():
        if not key.startswith("vision_model.") or key in _HF_IGNORED:
            if key == "visual_projection.weight":
                out["proj"] = v.T.contiguous()  # (width, embed_dim)
            continue  # text tower, logit_scale, position_ids
        k = key[len("vision_model."):]
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k)
        if m is None and k in glob:
            out[glob[k]] = v
        elif m and m.group(2) in layer:
            out[f"transformer.resblocks.{m.group(1)}.{layer[m.group(2)]}"] = v
        elif m and re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", m.group(2)):
            qkv[(int(m.group(1)), m.group(2)[10], m.group(2)[17:])] = v
        else:
            raise ValueError(f"unknown Hugging Face CLIP vision key {key!r}")
    for i, w in sorted({(i, w) for i, _, w in qkv}):
        missing = [p for p in "qkv" if (i, p, w) not in qkv]
        if missing:
            raise ValueError(f"HF checkpoint lacks vision_model.encoder.layers.{i}.self_attn.{missing[0]}_proj.{w}")
        suffix = "in_proj_weight" if w == "weight" else "in_proj_bias"
        out[f"transformer.resblocks.{i}.attn.{suffix}"] = torch.cat([qkv[(i, p, w)] for p in "qkv"])  # (3w, ...)
    return out


def open_clip_to_hf(state: dict) -> dict:
    """open_clip image-tower keys -> HF CLIPVisionModelWithProjection keys (inverse of hf_to_open_clip)."""
    glob, layer = {oc: hf for hf, oc in _HF_GLOBAL}, {oc: hf for hf, oc in _HF_LAYER}
    out = {}
    for key, v in state.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if key == "proj":
            out["visual_projection.weight"] = v.T.contiguous()  # (embed_dim, width)
        elif m is None and key in glob:
            out[f"vision_model.{glob[key]}"] = v
        elif m and m.group(2) in layer:
            out[f"vision_model.encoder.layers.{m.group(1)}.{layer[m.group(2)]}"] = v
        elif m and m.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias"):
            w = "weight" if m.group(2).endswith("weight") else "bias"
            for p, part in zip("qkv", v.chunk(3)):
                out[f"vision_model.encoder.layers.{m.group(1)}.self_attn.{p}_proj.{w}"] = part.contiguous()
        else:
            raise ValueError(f"open_clip image-tower key {key!r} has no Hugging Face CLIP equivalent")
    return out


def hf_vision_config(visual, quick_gelu: bool) -> dict:
    """config.json of a HF CLIPVisionModelWithProjection matching an open_clip VisionTransformer."""
    block = visual.transformer.resblocks[0]
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "hidden_size": visual.transformer.width, "intermediate_size": block.mlp.c_fc.out_features,
            "num_hidden_layers": len(visual.transformer.resblocks), "num_attention_heads": block.attn.num_heads,
            "image_size": visual.image_size[0], "patch_size": visual.patch_size[0], "num_channels": 3,
            "projection_dim": visual.output_dim, "hidden_act": "quick_gelu" if quick_gelu else "gelu",
            "layer_norm_eps": 1e-5}


def hf_tower_state(state: dict, projection: bool = True, prefix: str = "vision_model.") -> dict:
    """open_clip_to_hf, with or without `visual_projection.weight` and with `prefix` on the vision keys
    ("" as transformers 5 saves a CLIPVisionModel)."""
    hf = open_clip_to_hf(state)
    if not projection:
        hf.pop("visual_projection.weight", None)
    return {prefix + k.removeprefix("vision_model.") if k.startswith("vision_model.") else k: v for k, v in hf.items()}


def save_hf_folder(state: dict, folder, config: dict, projection: bool = True, prefix: str = "vision_model.") -> Path:
    """Write open_clip image-tower weights as a HF CLIP vision folder (config.json + model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(hf_tower_state(state, projection, prefix), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _hf_folder_state(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"HF folder {folder} has config.json but no model.safetensors / pytorch_model.bin")
    state = {}
    for f in files:  # sharded checkpoints: model-00001-of-0000N.safetensors, ...
        state.update(read_state_dict(f))
    return state


def check_state_dict(state: dict, reference: dict, what: str) -> None:
    """ValueError naming the first missing, unexpected or mis-shaped key."""
    for k in reference:
        if k not in state:
            raise ValueError(f"{what}: missing image-tower key {k!r} (shape {tuple(reference[k].shape)})")
    for k in state:
        if k not in reference:
            raise ValueError(f"{what}: unexpected key {k!r} (shape {tuple(state[k].shape)}); "
                             f"the image tower has no such key")
        if state[k].shape != reference[k].shape:
            raise ValueError(f"{what}: key {k!r} has shape {tuple(state[k].shape)}, "
                             f"the model expects {tuple(reference[k].shape)}")


def tower_prefix(keys) -> str:
    """The open_clip prefix of the image-tower keys among `keys` (`visual.`, `model.visual.`, ...), or ""."""
    return next((p for p in TOWER_PREFIXES if any(k.startswith(p) for k in keys)), "")


def image_tower(state: dict, reference: dict = None, what: str = "checkpoint") -> dict:
    """Image-tower tensors of a full or partial CLIP state dict, checked against `reference` if given."""
    if is_hf_state_dict(state):
        state = hf_to_open_clip(state)
        if "proj" not in state and reference is not None and "proj" in reference:
            state["proj"] = reference["proj"].clone()  # CLIPVisionModel has no projection: it stays frozen
    else:
        prefix = tower_prefix(state)
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if reference is not None:
        check_state_dict(state, reference, what)
        state = {k: state[k].to(reference[k].dtype) for k in reference}
    return state


def load_checkpoint(path, reference: dict = None, allow_pickle: bool = False) -> tuple:
    """(image-tower state dict, format name) of a checkpoint file or HF folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json: not a Hugging Face CLIP folder")
        state, fmt = _hf_folder_state(path), "hugging face clip folder"
    else:
        state = read_state_dict(path, allow_pickle)
        fmt = "hugging face clip file" if is_hf_state_dict(state) else f"{path.suffix.lstrip('.')} state dict"
    return image_tower(state, reference, f"checkpoint {path}"), fmt


def convert_checkpoint(src, dst, allow_pickle: bool = False) -> Path:
    """Save a checkpoint's image tower as open_clip-keyed safetensors (e.g. to drop a pickle once)."""
    state, _ = load_checkpoint(src, None, allow_pickle)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    return Path(dst)


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_HF_LORA = {"self_attn.out_proj": "attn.out_proj.weight", "mlp.fc1": "mlp.c_fc.weight", "mlp.fc2": "mlp.c_proj.weight"}


def _peft_target(module: str) -> tuple:
    """(open_clip weight name, row offset index into in_proj's thirds or None) of a peft module path."""
    m = re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.(.+)$", module)  # HF, with or without vision_model.
    if m:
        if re.fullmatch(r"self_attn\.[qkv]_proj", m.group(2)):
            return f"transformer.resblocks.{m.group(1)}.attn.in_proj_weight", "qkv".index(m.group(2)[10])
        if m.group(2) in _HF_LORA:
            return f"transformer.resblocks.{m.group(1)}.{_HF_LORA[m.group(2)]}", None
        raise ValueError(f"peft LoRA on {module!r} cannot be mapped onto the open_clip image tower")
    prefix = next((p for p in TOWER_PREFIXES if module.startswith(p)), "")
    return module[len(prefix):] + ".weight", None


def _peft_lora(state: dict, config: dict) -> dict:
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ValueError("peft adapters with alpha_pattern / rank_pattern are not supported")
    factors = {}
    for key, v in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"peft adapter key {key!r} is not a lora_A / lora_B weight")
        factors.setdefault(m.group(1), {})[m.group(2)] = v
    blocks = {}  # open_clip name -> [(third or None, B, A)]
    for module, f in factors.items():
        if set(f) != {"A", "B"}:
            raise ValueError(f"peft adapter has lora_{'A' if 'B' in f else 'B'} missing for {module!r}")
        r = f["A"].shape[0]
        scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        name, third = _peft_target(module)
        blocks.setdefault(name, []).append((third, f["B"] * scale, f["A"]))
    out = {}
    for name, parts in blocks.items():
        if parts[0][0] is None:
            out[name] = (parts[0][1], parts[0][2])
            continue
        d = parts[0][1].shape[0]  # rows of one of q/k/v
        b = torch.zeros(3 * d, sum(p[2].shape[0] for p in parts))  # (3d, sum r): block column per adapter
        col = 0
        for third, bt, at in parts:
            b[third * d:(third + 1) * d, col:col + at.shape[0]] = bt
            col += at.shape[0]
        out[name] = (b, torch.cat([p[2] for p in parts]))  # A: (sum r, d_in)
    return out


def load_lora(path, reference: dict) -> dict:
    """{image-tower key: (B, A)} with ΔW = B @ A, from byom-lab safetensors or a peft adapter."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    state = read_state_dict(path)
    if any(k.endswith("::B") for k in state):
        lora = {k[:-3]: (state[k], state[k[:-3] + "::A"]) for k in state if k.endswith("::B")}
    else:
        cfg_path = path.parent / "adapter_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"LoRA file {path} has peft-style keys but no {cfg_path} (needed for its scaling)")
        lora = _peft_lora(state, json.loads(cfg_path.read_text()))
    for name, (b, a) in lora.items():
        ref = reference.get(name)
        if ref is None or ref.ndim != 2:
            raise ValueError(f"LoRA {path}: {name!r} is not a weight matrix of the image tower")
        if b.shape[0] != ref.shape[0] or a.shape[1] != ref.shape[1] or b.shape[1] != a.shape[0]:
            raise ValueError(f"LoRA {path}: {name!r} has B {tuple(b.shape)} and A {tuple(a.shape)}, "
                             f"which do not multiply to the weight's shape {tuple(ref.shape)}")
    return {k: (b.float(), a.float()) for k, (b, a) in lora.items()}
