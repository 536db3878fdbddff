"""Checkpoint files and BYOM files on disk (lesson 08): a suite's towers written the way a practitioner holds
them, and what a result directory stores, file by file and tensor by tensor.

    keeping every model      T files of N float32 numbers:          T·4N bytes
    BYOM-FFT at m            shared θ* (4N) + per task mN int32 indices and mN float32 values: 8mN
    BYOM-LoRA at q           shared θ0 (4N) + per task and adapted matrix U_q, Σ_q, V_q: 4q(d_out + d_in + 1)

Symbols as in DESIGN.md: θ0, θ_t, θ* (the merged model), m = density, q = rank, T tasks, N parameters.
"""
import hashlib
import itertools
import json
import os
import struct
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch
from safetensors.torch import save_file
from torch import Tensor

from ..paper.checkpoints import hf_vision_config, open_clip_to_hf, save_hf_folder

FORMATS = ("safetensors", "open_clip", "hf_clip")  # how `write_checkpoints` can store a fine-tuned tower
PARTS = {"indices": "indices", "values": "values", "U": "U, S, V", "S": "U, S, V", "V": "U, S, V"}
# HF CLIP module (under vision_model.encoder.layers.<i>.) of each adapted open_clip matrix; in_proj is q, k, v
_HF_MODULES = {"attn.in_proj_weight": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "attn.out_proj.weight": ("self_attn.out_proj",), "mlp.c_fc.weight": ("mlp.fc1",),
               "mlp.c_proj.weight": ("mlp.fc2",)}


def _save(tensors: Mapping[str, Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def quick_gelu(visual) -> bool:
    """Whether an open_clip VisionTransformer uses QuickGELU (what its HF config must say)."""
    return type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def save_peft_adapter(lora: Mapping[str, tuple[Tensor, Tensor]], folder, lora_alpha: float | None = None) -> Path:
    """Write LoRA factors {open_clip key: (B, A)} (ΔW = B A, scaling folded in) as a peft adapter of HF CLIP.

    The inverse of `paper.checkpoints.load_lora`: `adapter_model.safetensors` holds lora_A / lora_B on the HF
    modules (in_proj becomes q_proj, k_proj, v_proj, each with its third of B and the same A), and B is stored
    divided by peft's scaling lora_alpha / r (default lora_alpha = r: scaling 1), which the reader folds back.

    Args:
        lora: {open_clip image-tower weight key: (B: d_out×r, A: r×d_in)}.
        folder: the adapter folder to create.
        lora_alpha: peft's lora_alpha (default: r).

    Returns:
        The folder as a Path.
    """
    folder = Path(folder)
    ranks = {a.shape[0] for _, a in lora.values()}
    if len(ranks) != 1:
        raise ValueError(f"a peft adapter has one rank r; these factors have ranks {sorted(ranks)}")
    r = ranks.pop()
    alpha = float(r if lora_alpha is None else lora_alpha)
    scale = alpha / r
    tensors, targets = {}, set()
    for key, (b, a) in lora.items():
        layer, _, name = key.removeprefix("transformer.resblocks.").partition(".")
        if not key.startswith("transformer.resblocks.") or name not in _HF_MODULES:
            raise ValueError(f"no HF CLIP module holds the LoRA of {key!r}")
        modules = _HF_MODULES[name]
        for module, part in zip(modules, b.chunk(len(modules))):  # B's rows: q, k, v thirds of in_proj
            prefix = f"base_model.model.vision_model.encoder.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a.clone()  # q, k and v each get their own copy
            tensors[f"{prefix}.lora_B.weight"] = part / scale
            targets.add(module.split(".")[-1])
    _save(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(targets),
              "bias": "none", "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def write_tower(state: Mapping[str, Tensor], fmt: str, path: Path, visual=None) -> Path:
    """One image tower as a practitioner may hold it: plain safetensors, open_clip (`visual.` keys), HF CLIP folder."""
    if fmt == "safetensors":
        return _save(state, path.with_suffix(".safetensors"))
    if fmt == "open_clip":
        return _save({f"visual.{k}": v for k, v in state.items()}, path.with_suffix(".safetensors"))
    if fmt == "hf_clip":
        if visual is None:
            raise ValueError("an HF CLIP folder needs the tower (`visual`) for its config.json")
        return save_hf_folder(dict(state), path, hf_vision_config(visual, quick_gelu(visual)))
    raise ValueError(f"unknown checkpoint format {fmt!r}; formats: {', '.join(FORMATS)}")


def path_bytes(path) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_checkpoints(suite, folder, formats: Sequence[str] = ("safetensors",), lora_alpha: float | None = None,
                      ) -> pd.DataFrame:
    """Write a suite's θ0 and fine-tuned towers (and LoRA adapters, if any) as checkpoint files in `folder`.

    θ0 goes to `base.safetensors`; task t's tower to `<task>.safetensors` or the HF CLIP folder `<task>/`,
    in the format formats[t % len(formats)]; its LoRA to the peft adapter folder `lora/<task>/`.

    Returns:
        One row per written checkpoint: task ("θ0" for the pretrained tower), kind ("full" or "lora"),
        format, path (relative to `folder`), bytes on disk.
    """
    folder = Path(folder)
    rows = [("θ0", "full", "safetensors", _save(suite.pretrained, folder / "base.safetensors"))]
    for task, state, fmt in zip(suite.tasks, suite.finetuned, itertools.cycle(formats)):
        rows.append((task, "full", fmt, write_tower(state, fmt, folder / task, suite.visual)))
    for task, lora in zip(suite.tasks, suite.lora):
        rows.append((task, "lora", "peft", save_peft_adapter(lora, folder / "lora" / task, lora_alpha)))
    return pd.DataFrame([{"task": task, "kind": kind, "format": fmt, "path": path.relative_to(folder).as_posix(),
                          "bytes": path_bytes(path)} for task, kind, fmt, path in rows])


def hf_key_pairs(keys: Sequence[str]) -> pd.DataFrame:
    """open_clip image-tower keys beside the HF CLIP keys they become, one row per HF key (in_proj gives three)."""
    shapes = {k: torch.empty(3 if "in_proj" in k else 1, 1, device="meta") for k in keys}  # only names matter
    return pd.DataFrame([{"open_clip": k, "hf_clip": hf} for k, v in shapes.items() for hf in open_clip_to_hf({k: v})])


def tensor_bytes(path) -> pd.DataFrame:
    """A safetensors file's parts read from its header: one row per tensor (key, dtype, shape, bytes) and one
    "(header)" row for the 8-byte length and the JSON header."""
    path = Path(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    rows = [{"key": k, "dtype": v["dtype"], "shape": tuple(v["shape"]), "bytes": v["data_offsets"][1] - v["data_offsets"][0]}
            for k, v in header.items()]
    rows.append({"key": "(header)", "dtype": "", "shape": (), "bytes": 8 + length})
    return pd.DataFrame(rows)


def data_sha256(path) -> str:
    """sha256 of a safetensors file's tensor bytes, its header left out: equal for files holding equal tensors
    in the same order, whatever their headers' spacing and metadata."""
    path = Path(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + length)
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def max_abs_difference(x: Mapping[str, object], y: Mapping[str, object]) -> float:
    """Largest |x − y| over the keys of two state dicts; LoRA entries (B, A) are compared as ΔW = B A."""
    if x.keys() != y.keys():
        raise ValueError(f"the two have different keys: {sorted(set(x) ^ set(y))[:3]} ...")
    dense = lambda v: v[0] @ v[1] if isinstance(v, tuple) else v  # noqa: E731
    return max((float((dense(x[k]).float() - dense(y[k]).float()).abs().max()) for k in x), default=0.0)


def _part(stem: str, key: str) -> str:
    if key == "(header)":
        return "headers"
    suffix = key.rpartition("::")[2] if "::" in key else ""
    return PARTS.get(suffix, "shared model" if stem != "task" else "task tensors")


def stored_bytes(directory) -> pd.DataFrame:
    """Every byte of a BYOM result directory by file and part: the shared model, indices, values, U/S/V
    factors, the safetensors headers and the manifest.

    Returns:
        Columns file (relative path), task (None for shared files), part, bytes; the bytes add up to the
        size of the directory on disk.
    """
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    tasks = {f"tasks/{name}.safetensors": name for name in manifest["tasks"]}
    rows = [{"file": "manifest.json", "task": None, "part": "manifest", "bytes": path_bytes(directory / "manifest.json")}]
    for name in manifest["files"]:
        parts = tensor_bytes(directory / name)
        stem = "task" if name in tasks else "shared"
        parts["part"] = [_part(stem, k) for k in parts["key"]]
        for part, size in parts.groupby("part", sort=False)["bytes"].sum().items():
            rows.append({"file": name, "task": tasks.get(name), "part": part, "bytes": int(size)})
    return pd.DataFrame(rows)


def where_bytes_go(stores: Mapping[str, object]) -> pd.DataFrame:
    """Bytes by part for each way of storing the same tasks, tidy (store, part, bytes).

    Args:
        stores: label -> a BYOM result directory (split by `stored_bytes`) or a DataFrame of checkpoints as
            `write_checkpoints` returns (counted whole, as "full models" or "adapters" besides θ0).
    """
    frames = []
    for label, store in stores.items():
        if isinstance(store, pd.DataFrame):
            parts = store["task"].eq("θ0").map({True: "shared model", False: None})
            parts = parts.fillna(store["kind"].map({"full": "full models", "lora": "adapters"}))
            frame = pd.DataFrame({"part": parts, "bytes": store["bytes"]})
        else:
            frame = stored_bytes(store)[["part", "bytes"]]
        frame = frame.groupby("part", sort=False, as_index=False)["bytes"].sum()
        frames.append(frame.assign(store=label))
    return pd.concat(frames, ignore_index=True)[["store", "part", "bytes"]]


def lora_shapes(pretrained: Mapping[str, Tensor], lora: Mapping[str, tuple]) -> list[tuple[int, int]]:
    """(d_out, d_in) of every adapted matrix."""
    return [tuple(pretrained[name].shape) for name in lora]


def storage_sweep(pretrained: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]],
                  lora: Sequence[Mapping[str, tuple]], folder, densities: Sequence[float] = (),
                  ranks: Sequence[int] = (), tasks: Sequence[str] | None = None, **base_kwargs) -> pd.DataFrame:
    """Save BYOM-FFT at each density and BYOM-LoRA at each rank into `folder`, and measure the files.

    Returns:
        One row per result: method, setting (m as a fraction, or q), task_bytes (tensor bytes of a task file,
        mean over tasks), task_file_bytes (the whole file, header included), formula_bytes (8·kept for
        BYOM-FFT, 4·q·Σ(d_out + d_in + 1) for BYOM-LoRA), shared_bytes, total_bytes (the directory) and
        ratio (total_bytes over T copies of the shared model file: keeping every model).
    """
    from ..merging import byom_fft, byom_lora

    folder = Path(folder)
    runs = [("byom_fft", d, lambda d=d: byom_fft(pretrained, finetuned, density=d, **base_kwargs)) for d in densities]
    runs += [("byom_lora", q, lambda q=q: byom_lora(pretrained, lora, rank=q)) for q in ranks]
    shapes = lora_shapes(pretrained, lora[0]) if lora else []
    rows = []
    for method, setting, merge in runs:
        result = merge()
        out = result.save(folder / f"{method}-{setting:g}", tasks=tasks)
        parts = stored_bytes(out)
        per_task = parts[parts.task.notna()]
        shared = parts[parts.file == "shared.safetensors"]["bytes"].sum()
        T = result.num_tasks
        if method == "byom_fft":
            formula = 8 * sum(result.num_params(t) for t in range(T)) / T
        else:
            formula = 4 * sum(min(setting, d_out, d_in) * (d_out + d_in + 1) for d_out, d_in in shapes)
        rows.append({"method": method, "setting": setting,
                     "task_bytes": per_task[per_task.part != "headers"]["bytes"].sum() / T,
                     "task_file_bytes": per_task["bytes"].sum() / T, "formula_bytes": formula,
                     "shared_bytes": int(shared), "total_bytes": path_bytes(out),
                     "ratio": path_bytes(out) / (T * shared)})
    return pd.DataFrame(rows)


def flip_byte(path, key: str | None = None, offset: int = -1) -> int:
    """Flip the lowest bit of one byte of a file in place (a bad disk, a bad copy); returns the byte's position.

    Args:
        path: the file.
        key: a tensor of a safetensors file: `offset` then counts within that tensor's bytes.
        offset: which byte (negative counts from the end), of the file or of the tensor.
    """
    path = Path(path)
    start, size = 0, path.stat().st_size
    if key is not None:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        if key not in header or key == "__metadata__":
            raise KeyError(f"{path} holds no tensor {key!r}")
        first, last = header[key]["data_offsets"]
        start, size = 8 + length + first, last - first
    position = start + offset % size
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ 1]))
    return position


def relative(text: str, folder) -> str:
    """`text` with the folder's path written as "." (printed output that does not depend on a temp folder)."""
    return str(text).replace(str(Path(folder)) + os.sep, "").replace(str(Path(folder)), ".")
