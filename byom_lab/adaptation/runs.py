"""Adaptation runs kept in the cache under a digest of everything they depend on, with their measured cost.

A run's key holds the method and its settings, the digests of θ0, every θ_t and every head, the
digests of the images it adapted on, and which part of the test split that was. Its learned
tensors (λ, heads) are stored with the loss history, the steps taken and the wall and CPU
seconds measured when it ran; a later call with the same content reads them back.
"""
import json
import time

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import cache, memo

VERSION = 1  # bump when what a run computes changes


def _data_digest(suite, part: str) -> list[str]:
    """Digests of each task's raw test images (and how they are normalised), and the part adapted on."""
    norm = getattr(suite.normalize, "__qualname__", repr(suite.normalize))
    return [memo.key(data=memo.tensors_digest(suite.data[task]["test"][0]), normalize=norm, part=part)
            for task in suite.tasks]


def run_key(kind: str, suite, settings: dict, part: str) -> dict:
    """What a run depends on: method, settings, model and head digests, image digests, part."""
    digests = suite.__dict__.setdefault("_model_digests", {})
    if "models" not in digests:  # hashing the towers takes a moment; once per suite object
        digests["models"] = [memo.state_digest(suite.pretrained)] + [memo.state_digest(m) for m in suite.finetuned]
    return {"kind": kind, "version": VERSION, "settings": settings, "models": digests["models"],
            "heads": [memo.tensors_digest(h) for h in suite.heads], "logit_scale": suite.logit_scale,
            "data": _data_digest(suite, part)}


def cached_run(kind: str, suite, settings: dict, part: str, train) -> tuple[dict, dict]:
    """(tensors, info) of train() -> (tensors, info), run once per content; info gains seconds and cpu_seconds."""

    def build(tmp):
        wall, cpu = time.perf_counter(), time.process_time()
        tensors, info = train()
        info = {**info, "seconds": round(time.perf_counter() - wall, 2), "cpu_seconds": round(time.process_time() - cpu, 2)}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"info": json.dumps(info)})

    def load(path):
        with safe_open(str(path), "pt") as f:
            info = json.loads(f.metadata()["info"])
        return load_file(str(path)), info

    path = cache.entry(f"adaptation-{kind}", run_key(kind, suite, settings, part)) / f"{kind}.safetensors"
    return cache.cached(path, build, load)
