"""Image-tower checkpoints read key by key whatever their file format, and written back the way they came.

Readers give the streamed merges (`byom_lab.merging.files`) a `.name`, a `.layout` and `.get(key)`
in open_clip image-tower keys. Safetensors files (plain keys, open_clip prefixes such as `visual.`,
or HF CLIP keys, converted on read) and HF CLIP folders holding safetensors are read one tensor at
a time; every other format `byom_lab.paper.checkpoints` reads (.pt/.bin state dicts, TorchScript,
pickles only with allow_pickle) is loaded whole, once. `.fmt` records how an input was stored, and
`write_tower` writes a state dict back the same way.
"""
import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .cache import atomic_path
from .merging.storage import atomic_dir, sha256_file
from .merging.streaming import read_header, read_tensor
from .paper.checkpoints import (hf_to_open_clip, hf_tower_state, is_hf_state_dict, load_checkpoint, load_lora,
                                open_clip_to_hf, save_hf_folder, tower_prefix)

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
PLAIN = {"kind": "safetensors", "prefix": ""}


def _hf_format(hf_keys, folder: Path | None) -> dict:
    """How HF CLIP weights were stored: folder or file, with or without projection and `vision_model.`."""
    fmt = {"kind": "hf_clip_folder" if folder else "hf_clip_file",
           "projection": "visual_projection.weight" in hf_keys or "proj" in hf_keys,
           "prefix": "vision_model." if any(k.startswith("vision_model.") for k in hf_keys) else ""}
    if folder:
        fmt["config"] = json.loads((folder / "config.json").read_text())
    return fmt


class _Tower:
    """What both readers share: a projection borrowed from θ0 when a CLIPVisionModel has none, checksums."""

    name: str
    files: list[Path]
    layout: dict
    fmt: dict

    def _borrow_projection(self, fallback) -> None:
        """Take θ0's `proj` (frozen) when HF weights lack it, as `paper.checkpoints.image_tower` does."""
        self.borrowed = {}
        if self.fmt["kind"].startswith("hf_") and "proj" not in self.layout and fallback is not None \
                and "proj" in fallback.layout:
            self.layout["proj"] = fallback.layout["proj"]
            self.borrowed["proj"] = fallback

    def get(self, key: str) -> torch.Tensor:
        """One image-tower tensor."""
        return self.borrowed[key].get(key) if key in self.borrowed else self._read(key)

    def sha256(self) -> dict:
        """{"path": the input as given, "sha256": of the file, or {file name: sha256} for a folder}."""
        if len(self.files) == 1 and str(self.files[0]) == self.name:
            return {"path": self.name, "sha256": sha256_file(self.files[0])}
        return {"path": self.name, "sha256": {f.name: sha256_file(f) for f in self.files}}


class StreamedTower(_Tower):
    """An image tower in safetensors file(s), one tensor read per `get` (HF CLIP keys converted on read)."""

    def __init__(self, path: Path, files: list[Path], fallback=None, folder: Path | None = None):
        self.name, self.files = str(path), ([folder / "config.json"] if folder else []) + list(files)
        header, self.where = {}, {}
        for f in files:  # sharded checkpoints: model-00001-of-0000N.safetensors, ...
            for key, spec in read_header(f).items():
                header[key], self.where[key] = spec, f
        meta = {k: torch.empty(shape, dtype=_DTYPES.get(dtype, torch.uint8), device="meta")
                for k, (dtype, shape) in header.items()}
        if is_hf_state_dict(meta):
            try:
                tower = hf_to_open_clip(meta)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            self.sources = {k: [self._stored(h) for h in open_clip_to_hf({k: v})] for k, v in tower.items()}
            self.layout = {k: (_NAMES[v.dtype], tuple(v.shape)) for k, v in tower.items()}
            self.fmt = _hf_format(header, folder)
        elif folder:
            raise ValueError(f"{path} has config.json but its safetensors hold no Hugging Face CLIP vision keys")
        else:
            prefix = tower_prefix(header)
            self.sources = {k[len(prefix):]: [k] for k in header if k.startswith(prefix)}
            self.layout = {k[len(prefix):]: spec for k, spec in header.items() if k.startswith(prefix)}
            self.fmt = {"kind": "safetensors", "prefix": prefix}
        self._borrow_projection(fallback)

    def _stored(self, hf_key: str) -> str:
        """The key as the file spells it (transformers 5 drops `vision_model.`)."""
        return hf_key if hf_key in self.where else hf_key.removeprefix("vision_model.")

    def _read(self, key: str) -> torch.Tensor:
        parts = {k: read_tensor(self.where[k], k) for k in self.sources[key]}
        return parts[self.sources[key][0]] if self.fmt["kind"] == "safetensors" else hf_to_open_clip(parts)[key]


class LoadedTower(_Tower):
    """A checkpoint in any other format, loaded whole once by `paper.checkpoints.load_checkpoint`."""

    def __init__(self, path: Path, allow_pickle: bool = False, fallback=None):
        try:
            self.state, fmt = load_checkpoint(path, None, allow_pickle)
        except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
            raise ValueError(f"{path} cannot be read as a checkpoint; it may be truncated or damaged "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.name = str(path)
        self.files = ([path / "config.json", *sorted(path.glob("pytorch_model*.bin"))] if path.is_dir() else [path])
        self.layout = {k: (_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in self.state.items()}
        self.fmt = ({**_hf_format(self.state, path), "prefix": "vision_model."} if path.is_dir()
                    else dict(PLAIN, converted_from=fmt))
        self._borrow_projection(fallback)

    def _read(self, key: str) -> torch.Tensor:
        return self.state[key]


def open_tower(path, allow_pickle: bool = False, fallback=None) -> _Tower:
    """A reader of the image tower in a checkpoint file or HF CLIP folder.

    Args:
        path: safetensors file (plain, open_clip-prefixed or HF keys), HF CLIP folder, or any other
            file `paper.checkpoints.load_checkpoint` reads.
        allow_pickle: allow unpickling whole modules (runs code from the file; only for trusted files).
        fallback: the pretrained reader, lending its `proj` to HF weights that have none.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json: not a Hugging Face CLIP folder")
        files = sorted(path.glob("*.safetensors"))
        return StreamedTower(path, files, fallback, folder=path) if files else LoadedTower(path, allow_pickle, fallback)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return StreamedTower(path, [path], fallback)
    return LoadedTower(path, allow_pickle, fallback)


def lora_files(path) -> list[Path]:
    """The files a LoRA adapter is read from: byom-lab safetensors, or peft's weights and config."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / "adapter_model.safetensors" if path.is_dir() else path
    config = folder / "adapter_config.json"
    return [weights] + ([config] if config.is_file() and (path.is_dir() or weights.name == "adapter_model.safetensors")
                        else [])


def read_lora(path, reference: dict) -> dict:
    """{image-tower key: (B, A)} of a LoRA adapter (`paper.checkpoints.load_lora`), its file checked first."""
    weights = lora_files(path)[0]
    read_header(weights)  # a missing, damaged or truncated file is named here
    return load_lora(path, reference)


def write_tower(state: dict, fmt: dict | None, out, overwrite: bool = False) -> Path:
    """Write an open_clip image-tower state dict the way an input was stored (`fmt` of its reader).

    Args:
        state: {open_clip image-tower key: tensor}.
        fmt: a reader's `.fmt` (HF CLIP folder or file, safetensors with a key prefix); None: plain safetensors.
        out: the file (or, for an HF CLIP folder, the folder) to write, atomically.
        overwrite: replace an existing `out`.
    """
    fmt, out = fmt or PLAIN, Path(out)
    if fmt["kind"] == "hf_clip_folder":
        with atomic_dir(out, overwrite, marker="config.json") as tmp:
            save_hf_folder(state, tmp, fmt["config"], fmt["projection"], fmt["prefix"])
            (tmp / "model.safetensors").chmod(0o644)  # safetensors writes 0600; models are ordinary files
        return out
    if fmt["kind"] == "hf_clip_file":
        tensors = hf_tower_state(state, fmt["projection"], fmt["prefix"])
    else:
        tensors = {fmt["prefix"] + k: v for k, v in state.items()}
    if out.exists() and (out.is_dir() or not overwrite):
        raise FileExistsError(f"{out} already exists; pass --force (or overwrite=True) to replace it"
                              if not out.is_dir() else f"{out} is a folder; name a file to write")
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    return out
