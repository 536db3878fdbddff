"""The tiny suites: build (first call, cached) or load the backbone, task data and fine-tunes."""
import json
import time
from dataclasses import asdict

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import cache
from .. import manifest as mf
from ..finetune import FinetuneConfig, finetune_full, finetune_lora, num_steps
from ..model import create_tiny_clip, visual_state_dict, zeroshot_head
from ..suite import SPLITS, Suite
from .sources import make_splits
from .text import Tokenizer

DATA_VERSION = 1  # bump when the generated task data change
BUILD_VERSION = 2  # bump when anything else that changes cached fine-tunes changes (2: functional forward, fused AdamW, factored LoRA)


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


def _data_path(spec):
    return cache.entry("data", [DATA_VERSION, asdict(spec)]) / f"{spec.name}.safetensors"


def _checkpoint_path(kind, spec, key):
    return cache.entry(kind, key) / f"{spec.name}.safetensors"


def _task_data(spec, max_train=None):
    def build(tmp):
        splits = make_splits(spec)
        _save_tensors({f"{s}_{w}": t for s, (x, y) in splits.items() for w, t in (("x", x), ("y", y))}, tmp)

    def load(path):
        t = load_file(str(path))
        return {s: (t[f"{s}_x"], t[f"{s}_y"]) for s in SPLITS}

    data = cache.cached(_data_path(spec), build, load)
    if max_train:
        x, y = data["train"]
        data["train"] = (x[:max_train], y[:max_train])
    return data


def _finetuned(kind, spec, key, train, visual, pretrained, head, scale, cfg, bar=None):
    """Cached full state dict (kind='full') or LoRA factors (kind='lora') for one task."""
    x, y = train

    def build(tmp):
        if kind == "full":
            _save_tensors(finetune_full(visual, pretrained, head, scale, x, y, cfg, f"full {spec.name}", bar), tmp)
        else:
            lora = finetune_lora(visual, pretrained, head, scale, x, y, cfg, f"lora {spec.name}", bar)
            _save_tensors({f"{k}::{w}": t for k, (b, a) in lora.items() for w, t in (("B", b), ("A", a))}, tmp)

    def load(path):
        t = load_file(str(path))
        if kind == "full":
            missing = set(pretrained) - set(t)
            if missing:
                raise ValueError(f"checkpoint {path} lacks keys such as {sorted(missing)[:3]}")
            return t
        return {k[:-3]: (t[k], t[k[:-3] + "::A"]) for k in t if k.endswith("::B")}

    return cache.cached(_checkpoint_path(kind, spec, key), build, load)


class _Build:
    """What a suite load built or read, and how long each part took; one progress bar over the fine-tuning steps."""

    def __init__(self, steps_to_build: int, name: str):
        self.parts = []
        self.bar = tqdm(total=steps_to_build, desc=f"building {name}", unit="step") if steps_to_build else None

    def part(self, what: str, task: str, built: bool, run):
        start = time.time()
        out = run()
        self.parts.append({"part": what, "task": task, "built": built, "seconds": round(time.time() - start, 2)})
        return out

    def close(self):
        if self.bar is not None:
            self.bar.close()


def load_tiny_suite(name: str = "tiny", tasks=None, finetune: FinetuneConfig = None, max_train: int = None) -> Suite:
    """Build (first call, cached) or load one of the tiny suites named in the manifest."""
    suites = mf.suites()
    if name not in suites:
        raise ValueError(f"unknown tiny suite {name!r}; valid: {sorted(suites)}")
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
    key = {t: [BUILD_VERSION, backbone_sha, asdict(specs[t]), asdict(cfg), max_train] for t in names}
    missing = {(kind, t) for t in names for kind in ("full", "lora") if not _checkpoint_path(kind, specs[t], key[t]).exists()}
    n_train = {t: min(specs[t].sizes["train"], max_train or specs[t].sizes["train"]) for t in names}
    build = _Build(sum(num_steps(n_train[t], cfg) for _, t in missing), name)
    build.parts.append({"part": "backbone", "task": "", "built": False, "seconds": round(time.time() - start, 2)})
    heads, data, full, lora = [], {}, [], []
    try:
        for t in names:
            spec = specs[t]
            heads.append(build.part("zero-shot head", t, True,
                                    lambda: zeroshot_head(model, tok, spec.classes, spec.family, templates)))
            data[t] = build.part("data", t, not _data_path(spec).exists(), lambda: _task_data(spec, max_train))
            for kind, out in (("full", full), ("lora", lora)):
                out.append(build.part(f"{kind} fine-tune", t, (kind, t) in missing, lambda: _finetuned(
                    kind, spec, key[t], data[t]["train"], model.visual, pretrained, heads[-1], scale, cfg, build.bar)))
    finally:
        build.close()
    identity = {"suite": name, "tasks": names, "backbone_sha256": backbone_sha, "finetune": asdict(cfg),
                "max_train": max_train, "build": BUILD_VERSION}
    info = {"identity": identity, "seconds": round(time.time() - start, 1), "parts": build.parts}
    return Suite(name=name, tasks=names, pretrained=pretrained, finetuned=full, lora=lora, heads=heads, data=data,
                 visual=model.visual, logit_scale=scale, classes=[list(specs[t].classes) for t in names], info=info)
