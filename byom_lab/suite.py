"""Suites: a backbone, its tasks (data, heads) and one full + one LoRA fine-tune per task."""
import json
import time
from typing import Callable
from dataclasses import asdict, dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import cache
from . import manifest as mf
from .finetune import FinetuneConfig, finetune_full, finetune_lora
from .model import create_tiny_clip, preprocess, visual_state_dict, zeroshot_head
from .tiny.sources import SPLITS, make_splits
from .tiny.text import Tokenizer

BUILD_VERSION = 1
MAX_CACHED_INPUT_BYTES = 512 * 2**20  # bump when anything that changes cached artifacts changes


@dataclass
class Suite:
    """A backbone + tasks + fine-tuned checkpoints (see DESIGN.md, "Two suites, one API")."""

    name: str
    tasks: list
    pretrained: dict
    finetuned: list
    lora: list
    heads: list
    data: dict
    visual: torch.nn.Module
    logit_scale: float
    classes: list
    info: dict = field(default_factory=dict)
    normalize: Callable = preprocess  # uint8 images -> model inputs
    _inputs: dict = field(default_factory=dict, repr=False)
    _reference: dict = field(default_factory=dict, repr=False)

    def task_index(self, task) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"task index {task} out of range 0..{len(self.tasks) - 1}")
            return task
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r} in suite {self.name!r}; tasks: {self.tasks}")
        return self.tasks.index(task)

    def inputs(self, task, split: str):
        """Preprocessed float images and labels of a task's split (kept; large splits stay uint8)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
        key = (self.tasks[self.task_index(task)], split)
        if key not in self._inputs:
            x, y = self.data[key[0]][split]
            small = x.numel() * 4 <= MAX_CACHED_INPUT_BYTES  # else normalised batch by batch when used
            self._inputs[key] = (self.normalize(x) if small else x, y)
        return self._inputs[key]


def _load_backbone():
    path = mf.verified_asset("tiny-clip")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model = create_tiny_clip()
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    model.eval()
    return model, Tokenizer(json.loads(meta["vocab"])), mf.sha256_file(path)


def _save_tensors(tensors: dict, path, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _task_data(spec, max_train=None):
    def build(tmp):
        splits = make_splits(spec)
        _save_tensors({f"{s}_{w}": t for s, (x, y) in splits.items() for w, t in (("x", x), ("y", y))}, tmp)

    def load(path):
        t = load_file(str(path))
        return {s: (t[f"{s}_x"], t[f"{s}_y"]) for s in SPLITS}

    path = cache.entry("data", [BUILD_VERSION, asdict(spec)]) / f"{spec.name}.safetensors"
    data = cache.cached(path, build, load)
    if max_train:
        x, y = data["train"]
        data["train"] = (x[:max_train], y[:max_train])
    return data


def _finetuned(kind, spec, key, train, visual, pretrained, head, scale, cfg):
    """Cached full state dict (kind='full') or LoRA factors (kind='lora') for one task."""
    x, y = train

    def build(tmp):
        if kind == "full":
            _save_tensors(finetune_full(visual, pretrained, head, scale, x, y, cfg, desc=f"full {spec.name}"), tmp)
        else:
            lora = finetune_lora(visual, pretrained, head, scale, x, y, cfg, desc=f"lora {spec.name}")
            _save_tensors({f"{k}::{w}": t for k, (b, a) in lora.items() for w, t in (("B", b), ("A", a))}, tmp)

    def load(path):
        t = load_file(str(path))
        if kind == "full":
            missing = set(pretrained) - set(t)
            if missing:
                raise ValueError(f"checkpoint {path} lacks keys such as {sorted(missing)[:3]}")
            return t
        return {k[:-3]: (t[k], t[k[:-3] + "::A"]) for k in t if k.endswith("::B")}

    path = cache.entry(kind, key) / f"{spec.name}.safetensors"
    return cache.cached(path, build, load)


def suite_names() -> list:
    return sorted(mf.suites()) + ["paper"]


def load_suite(name: str = "tiny", tasks=None, finetune: FinetuneConfig = None, max_train: int = None,
               **paper_kwargs) -> Suite:
    """Build (first call, cached) or load a suite.

    Args:
        name: "tiny", "tiny-similar", "tiny-dissimilar" (or "paper", see byom_lab.paper).
        tasks: optional subset of the suite's task names, in the suite's order.
        finetune: fine-tuning hyperparameters (defaults to FinetuneConfig()).
        max_train: use only the first max_train training images per task (quick reduced suites).
        **paper_kwargs: for "paper" only, passed to byom_lab.paper.load_paper_suite.
    """
    suites = mf.suites()
    if name == "paper":
        from .paper import load_paper_suite

        return load_paper_suite(tasks=tasks, **paper_kwargs)
    if name not in suites:
        raise ValueError(f"unknown suite {name!r}; valid suites: {suite_names()}")
    names = list(suites[name])
    if tasks is not None:
        bad = [t for t in tasks if t not in names]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r} for suite {name!r}; tasks: {names}")
        names = [t for t in names if t in tasks]
    cfg = finetune or FinetuneConfig()
    specs = mf.tiny_tasks()
    start = time.time()
    model, tok, backbone_sha = _load_backbone()
    pretrained = visual_state_dict(model)
    scale = float(model.logit_scale.detach().exp())
    templates = mf.templates()
    heads, data, full, lora = [], {}, [], []
    for t in names:
        spec = specs[t]
        heads.append(zeroshot_head(model, tok, spec.classes, spec.family, templates))
        data[t] = _task_data(spec, max_train)
        key = [BUILD_VERSION, backbone_sha, asdict(spec), asdict(cfg), max_train]
        full.append(_finetuned("full", spec, key, data[t]["train"], model.visual, pretrained, heads[-1], scale, cfg))
        lora.append(_finetuned("lora", spec, key, data[t]["train"], model.visual, pretrained, heads[-1], scale, cfg))
    identity = {"suite": name, "tasks": names, "backbone_sha256": backbone_sha, "finetune": asdict(cfg),
                "max_train": max_train, "build": BUILD_VERSION}
    info = {"identity": identity, "seconds": round(time.time() - start, 1)}
    return Suite(name=name, tasks=names, pretrained=pretrained, finetuned=full, lora=lora, heads=heads, data=data,
                 visual=model.visual, logit_scale=scale, classes=[list(specs[t].classes) for t in names], info=info)
