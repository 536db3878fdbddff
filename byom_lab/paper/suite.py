"""The `paper` suite: an open_clip CLIP (ViT-B/32, B/16, L/14), the paper's 8 datasets, local checkpoints.

Nothing is downloaded unless open_clip may (a weight tag without HF_HUB_OFFLINE); every other input is
a local path: the weights (BYOM_LAB_PAPER_WEIGHTS), the fine-tuned checkpoints
(BYOM_LAB_PAPER_CHECKPOINTS) and the datasets (BYOM_LAB_PAPER_DATA). File formats are listed in
byom_lab.paper.checkpoints, dataset layouts in byom_lab.paper.data.
"""
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import manifest as mf
from ..model import open_clip, visual_state_dict, zeroshot_head
from ..suite import Suite
from .checkpoints import check_state_dict, load_checkpoint, load_lora, read_state_dict
from .data import TEMPLATES, expected_layouts, find_dataset, load_dataset

ENV_WEIGHTS, ENV_CHECKPOINTS, ENV_DATA = "BYOM_LAB_PAPER_WEIGHTS", "BYOM_LAB_PAPER_CHECKPOINTS", "BYOM_LAB_PAPER_DATA"
_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's TorchScript files


@dataclass(frozen=True)
class ModelSpec:
    """Which open_clip model a paper-suite model name means, and its default weight tag."""

    name: str
    open_clip: str
    tag: str = None
    quick_gelu: bool = False


class Normalize:
    """uint8 (n, 3, H, W) images -> float model inputs with the model's own mean and std."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std

    def __repr__(self):
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def paper_datasets() -> list:
    return list(mf.manifest()["paper"]["datasets"])


def model_spec(model: str) -> ModelSpec:
    """A manifest model (paper.models) or, for tests and custom towers, any open_clip model name."""
    oc = open_clip()
    models = mf.manifest()["paper"]["models"]
    if model in models:
        entry = models[model]
        name, tag = entry["open_clip"], entry.get("pretrained")
        quick = entry.get("quick_gelu", oc.get_pretrained_cfg(name, tag).get("quick_gelu", False) if tag else False)
        return ModelSpec(model, name, tag, bool(quick))
    if model in oc.list_models():
        return ModelSpec(model, model, None, bool(oc.get_model_config(model).get("quick_gelu", False)))
    raise ValueError(f"unknown model {model!r}; the paper suite has {list(models)} (or any open_clip model name)")


def offline() -> bool:
    """True when Hugging Face downloads are off (HF_HUB_OFFLINE, read now, not at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _no_weights(spec: ModelSpec, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no pretrained weights for model {spec.name!r} (open_clip {spec.open_clip}): {why}. Provide a local "
        f"file: load_paper_suite(weights='/path/to/open_clip_pytorch_model.bin' | '.safetensors' | OpenAI's "
        f"'{spec.open_clip}.pt' | 'local-dir:/folder'), or set {ENV_WEIGHTS}=/path")


def tag_file(spec: ModelSpec, tag: str) -> str:
    """Local file of an open_clip weight tag: from the HF cache when offline, else downloaded by open_clip."""
    oc = open_clip()
    cfg = oc.get_pretrained_cfg(spec.open_clip, tag)
    if offline():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg.get("hf_hub", "").rstrip("/") + "/")
        for name in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, name) if repo else None
            if isinstance(hit, str):
                return hit
        raise _no_weights(spec, f"open_clip tag {tag!r} is not in the local cache and HF_HUB_OFFLINE is set")
    try:
        return oc.pretrained.download_pretrained(cfg)
    except Exception as e:  # network, auth, disk: all end the same way for the user
        raise _no_weights(spec, f"downloading open_clip tag {tag!r} failed ({type(e).__name__}: {e})") from e


def resolve_weights(spec: ModelSpec, weights=None) -> tuple:
    """("local-dir" | "file", path, tag or None), failing fast (before any model is built)."""
    weights = weights or os.environ.get(ENV_WEIGHTS) or spec.tag
    if not weights:
        raise _no_weights(spec, f"it has no default open_clip tag and {ENV_WEIGHTS} is not set")
    weights = str(weights)
    if weights.startswith("local-dir:") or Path(weights).is_dir():
        folder = Path(weights.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"weights folder {folder} lacks open_clip_config.json (open_clip local-dir layout)")
        return "local-dir", folder, None
    if Path(weights).is_file():
        return "file", Path(weights), None
    tags = open_clip().list_pretrained_tags_by_model(spec.open_clip)
    if weights in tags:
        return "file", Path(tag_file(spec, weights)), weights
    raise _no_weights(spec, f"{weights!r} is neither a file, a folder nor an open_clip tag (tags: {tags})")


def _load_full_state(model, path: Path, allow_pickle: bool) -> None:
    state = read_state_dict(path, allow_pickle)
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items() if k not in _JIT_EXTRAS}
    reference = model.state_dict()
    if "logit_scale" in state and state["logit_scale"].shape != reference["logit_scale"].shape:
        state["logit_scale"] = state["logit_scale"].reshape(reference["logit_scale"].shape)
    check_state_dict(state, reference, f"weights {path}")
    model.load_state_dict(state)


def load_pretrained(model: str = "ViT-B-32", weights=None, allow_pickle: bool = False) -> tuple:
    """(open_clip CLIP in eval mode, its tokenizer, Normalize, info) for a paper-suite model."""
    oc = open_clip()
    spec = model_spec(model)
    kind, path, tag = resolve_weights(spec, weights)
    if kind == "local-dir":
        clip = oc.create_model(f"local-dir:{path}")
        tokenizer = oc.get_tokenizer(f"local-dir:{path}")
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No pretrained weights loaded")
            clip = oc.create_model(spec.open_clip, pretrained=None, force_quick_gelu=spec.quick_gelu)
        _load_full_state(clip, path, allow_pickle)
        tokenizer = oc.get_tokenizer(spec.open_clip)
    clip.eval()
    pre = dict(getattr(clip.visual, "preprocess_cfg", {}))
    tag_cfg = oc.get_pretrained_cfg(spec.open_clip, tag) if tag else {}
    pre.update({k: v for k, v in tag_cfg.items() if k in ("mean", "std")})
    normalize = Normalize(pre.get("mean", oc.OPENAI_DATASET_MEAN), pre.get("std", oc.OPENAI_DATASET_STD))
    info = {"model": model, "open_clip": spec.open_clip, "weights": str(path), "tag": tag,
            "quick_gelu": type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"}
    return clip, tokenizer, normalize, info


def select_tasks(tasks=None) -> list:
    """Paper dataset names, in the manifest's order; ValueError naming the valid ones."""
    valid = paper_datasets()
    if tasks is None:
        return valid
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    bad = [t for t in tasks if t not in valid]
    if bad:
        raise ValueError(f"unknown dataset {bad[0]!r} for suite 'paper'; valid: {valid}")
    return tasks


def _task_path(source, model: str, task: str, names: list, what: str, env: str) -> Path:
    """The first existing `<root>[/<model>]/<name>` for a task, or the task's entry of a {task: path} dict."""
    if isinstance(source, dict):
        if task not in source:
            raise ValueError(f"{what} given as a dict lacks task {task!r} (has {sorted(source)})")
        path = Path(source[task])
        if not path.exists():
            raise FileNotFoundError(f"{what} for {task}: {path} does not exist")
        return path
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root} does not exist (argument or {env})")
    tried = []
    for base in (root / model, root):
        for name in names:
            path = base / name.format(t=task)
            tried.append(str(path))
            if path.exists():
                return path.parent if path.name == "config.json" else path
    raise FileNotFoundError(f"no {what} for task {task}; looked for: " + ", ".join(tried))


CHECKPOINT_NAMES = [f"{t}/{f}" for t in ("{t}", "{t}Val") for f in (
    "finetuned.safetensors", "finetuned.pt", "nonlinear_finetuned.pt", "config.json")] + ["{t}.safetensors", "{t}.pt"]
LORA_NAMES = ["{t}.safetensors", "{t}/adapter_model.safetensors", "{t}/lora.safetensors"]


def _check_zeroshot(roots: list, pretrained: dict, allow_pickle: bool) -> dict:
    """Compare the task-vectors release's zeroshot.pt (if any) with the loaded pretrained tower."""
    for path in roots:
        if path.is_file():
            try:
                state, _ = load_checkpoint(path, pretrained, allow_pickle)
            except ValueError as e:
                return {"zeroshot": str(path), "zeroshot_check": f"not checked: {str(e)[:120]}"}
            diff = max(float((state[k] - v).abs().max()) for k, v in pretrained.items())
            if diff > 1e-3:
                warnings.warn(f"{path} differs from the pretrained weights by up to {diff:.3g}: the fine-tuned "
                              f"checkpoints may not start from these weights")
            return {"zeroshot": str(path), "zeroshot_max_abs_diff": diff}
    return {}


def _check_activation(path: Path, quick_gelu: bool) -> None:
    """Warn when a HF folder's config.json names another activation than the loaded model uses."""
    config = path / "config.json"
    if not config.is_file():
        return
    cfg = json.loads(config.read_text())
    act = cfg.get("hidden_act") or (cfg.get("vision_config") or {}).get("hidden_act")
    if act and (act == "quick_gelu") != quick_gelu:
        warnings.warn(f"{config} says hidden_act={act!r} but the model uses {'QuickGELU' if quick_gelu else 'GELU'}: "
                      f"features will differ from the checkpoint's own model")


def load_paper_suite(tasks=None, model: str = "ViT-B-32", weights=None, checkpoints=None, lora_checkpoints=None,
                     data_root=None, image_size: int = None, max_images: int = None,
                     allow_pickle: bool = False) -> Suite:
    """The paper suite: pretrained tower, fine-tuned towers, zero-shot heads and data, all from local files.

    Args:
        tasks: dataset names (default: all 8 of data_manifest.yaml `paper.datasets`, in that order).
        model: a `paper.models` name (ViT-B-32, ViT-B-16, ViT-L-14) or any open_clip model name.
        weights: open_clip tag, state-dict file, OpenAI TorchScript file or `local-dir:` folder
            (default: $BYOM_LAB_PAPER_WEIGHTS, else the manifest's tag, which needs network or the HF cache).
        checkpoints: root of `<root>[/<model>]/<Dataset>[Val]/finetuned.{pt,safetensors}` (task-vectors)
            or `<root>[/<model>]/<Dataset>/` HF CLIP vision folders, or a {task: path} dict
            (default: $BYOM_LAB_PAPER_CHECKPOINTS).
        lora_checkpoints: optional root of `<Dataset>.safetensors` or `<Dataset>/` peft adapters, or a dict.
        data_root: folder of the datasets (default: $BYOM_LAB_PAPER_DATA); layouts in byom_lab.paper.data.
        image_size: must equal the model's input size when given (images are stored at that size).
        max_images: keep at most this many images per split (a seeded subset) for quick runs.
        allow_pickle: unpickle whole-module checkpoints (task-vectors' `ImageEncoder` files); runs code
            from those files, so only for files you trust.
    """
    start = time.time()
    names = select_tasks(tasks)
    checkpoints = checkpoints or os.environ.get(ENV_CHECKPOINTS)
    data_root = data_root or os.environ.get(ENV_DATA)
    if not checkpoints:
        raise ValueError(f"no fine-tuned checkpoints: pass checkpoints= (a folder or {{task: path}}) "
                         f"or set {ENV_CHECKPOINTS}")
    if not data_root:
        raise ValueError(f"no data folder: pass data_root= or set {ENV_DATA}; "
                         f"e.g. {expected_layouts(names[0], '<root>')}")
    for t in names:  # cheap checks first: a wrong path fails before any model is built
        find_dataset(data_root, t)
    ckpt_paths = {t: _task_path(checkpoints, model, t, CHECKPOINT_NAMES, "fine-tuned checkpoint", ENV_CHECKPOINTS)
                  for t in names}
    lora_paths = {t: _task_path(lora_checkpoints, model, t, LORA_NAMES, "LoRA checkpoint", "lora_checkpoints")
                  for t in names} if lora_checkpoints else {}
    clip, tokenizer, normalize, info = load_pretrained(model, weights, allow_pickle)
    size = clip.visual.image_size[0]
    if image_size is not None and image_size != size:
        raise ValueError(f"model {model!r} takes {size} px images; image_size={image_size} does not fit it")
    pretrained = visual_state_dict(clip)
    finetuned, formats = [], {}
    for t in names:
        state, formats[t] = load_checkpoint(ckpt_paths[t], pretrained, allow_pickle)
        _check_activation(ckpt_paths[t], info["quick_gelu"])
        finetuned.append(state)
    if not isinstance(checkpoints, dict):
        roots = [Path(checkpoints) / m / f"zeroshot.{e}" for m in (model, "") for e in ("safetensors", "pt")]
        info.update(_check_zeroshot(roots, pretrained, allow_pickle))
    lora = [load_lora(lora_paths[t], pretrained) for t in lora_paths]
    heads, data, classes, data_info = [], {}, [], {}
    for t in names:
        data[t], cls, data_info[t] = load_dataset(data_root, t, size, max_images)
        classes.append(cls)
        heads.append(zeroshot_head(clip, tokenizer, cls, "", TEMPLATES[t]))
    info.update({"checkpoints": {t: str(p) for t, p in ckpt_paths.items()}, "checkpoint_formats": formats,
                 "lora": {t: str(p) for t, p in lora_paths.items()}, "data": data_info, "image_size": size,
                 "max_images": max_images, "seconds": round(time.time() - start, 1)})
    info["identity"] = {k: info[k] for k in ("model", "weights", "checkpoints", "lora", "image_size", "max_images")}
    info["identity"]["tasks"] = names
    return Suite(name="paper", tasks=names, pretrained=pretrained, finetuned=finetuned, lora=lora, heads=heads,
                 data=data, visual=clip.visual, logit_scale=float(clip.logit_scale.detach().exp()), classes=classes,
                 info=info, normalize=normalize)
