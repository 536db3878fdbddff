"""What a suite holds and what fine-tuning did to it: zero-shot scores and confusions, captioned vs
code-word classes, how far each layer's weights moved, and what serving T tasks stores.

Zero-shot classification (CLIP, arXiv 2103.00020, §3.1.2): with f_θ(x) the image tower's features and
w_c the class embeddings (the rows of a task's frozen head, each of norm 1),

    ŷ(x) = argmax_c cos(f_θ(x), w_c) = argmax_c ⟨f_θ(x)/‖f_θ(x)‖, w_c⟩.
"""
import re

import pandas as pd
import torch

from .. import manifest as mf
from ..evaluation import eval_device, predictions
from ..model import encode_images

MEGABYTE = 2**20


@torch.inference_mode()
def zero_shot_scores(suite, task, state_dict: dict = None, split: str = "test", limit: int = None,
                     batch_size: int = 250) -> torch.Tensor:
    """(n, C) cosine similarities cos(f_θ(x), w_c) of a task split's images (the first `limit`) with its class embeddings.

    The plain open_clip forward in float32 (θ = state_dict, default θ0); its argmax is the zero-shot prediction.
    """
    t = suite.task_index(task)
    x, _ = suite.inputs(t, split)
    x = x[:limit] if limit is not None else x
    device = eval_device()
    sd = {k: v.to(device) for k, v in (state_dict or suite.pretrained).items()}
    visual, head = suite.visual.to(device), suite.heads[t].to(device)  # head: (C, d), unit rows
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        xb = suite.normalize(xb) if xb.dtype == torch.uint8 else xb
        out.append((encode_images(visual, xb.to(device), sd) @ head.T).cpu())  # (b, C): unit features · unit rows
    return torch.cat(out) if out else torch.zeros(0, len(head))


def confusion_matrix(suite, task, state_dict: dict = None, split: str = "test", limit: int = None) -> pd.DataFrame:
    """Counts of (true class, predicted class) on a task's split under state_dict (default θ0): rows true, columns predicted."""
    t = suite.task_index(task)
    pred, y = predictions(suite, state_dict or suite.pretrained, t, split, limit=limit)
    names = suite.classes[t]
    counts = torch.zeros(len(names), len(names), dtype=torch.long)
    counts.index_put_((y.long(), pred.long()), torch.ones(len(y), dtype=torch.long), accumulate=True)
    return pd.DataFrame(counts.numpy(), index=pd.Index(names, name="true"), columns=pd.Index(names, name="predicted"))


def task_table(suite) -> pd.DataFrame:
    """One row per task: task, mirrors (the paper's dataset it stands for), classes, images per split, captioned classes."""
    specs = mf.tiny_tasks()
    captioned = captioned_classes(suite) if all(t in specs for t in suite.tasks) else [None] * len(suite.tasks)
    rows = []
    for t, task in enumerate(suite.tasks):
        sizes = {split: len(suite.data[task][split][1]) for split in ("train", "val", "test")}
        rows.append({"task": task, "mirrors": specs[task].mirrors if task in specs else task,
                     "classes": len(suite.classes[t]), **sizes,
                     "captioned": len(captioned[t]) if captioned[t] is not None else None})
    return pd.DataFrame(rows)


def captioned_classes(suite) -> list:
    """Per task, the set of class indices whose names the tiny backbone's pretraining captions used (the manifest's `captioned`).

    The other classes were captioned with code words (e.g. "cars1"), so the text tower never saw their names
    next to their images. Split tasks (the similar pair) map through their parent task's list.
    """
    specs = mf.tiny_tasks()
    out = []
    for task in suite.tasks:
        if task not in specs:
            raise ValueError(f"task {task!r} is not a tiny-suite task: only the tiny suites record captioned classes")
        spec = specs[task]
        if spec.parent:
            parent = set(specs[spec.parent].captioned)
            out.append({i for i, c in enumerate(spec.class_subset) if c in parent})
        else:
            out.append(set(spec.captioned))
    return out


def class_accuracy(suite, models=None, split: str = "test") -> pd.DataFrame:
    """One row per (task, class): task, class, captioned, images, accuracy, predicted (images predicted as the class).

    `models` is one state dict for every task (default θ0) or a list with one per task.
    """
    captioned = captioned_classes(suite)
    rows = []
    for t, task in enumerate(suite.tasks):
        sd = models[t] if isinstance(models, (list, tuple)) else (models or suite.pretrained)
        pred, y = predictions(suite, sd, t, split)
        for c, name in enumerate(suite.classes[t]):
            mine = y == c
            n = int(mine.sum())
            rows.append({"task": task, "class": name, "captioned": c in captioned[t], "images": n,
                         "accuracy": float((pred[mine] == c).float().mean()) if n else float("nan"),
                         "predicted": int((pred == c).sum())})
    return pd.DataFrame(rows)


def layer_of(key: str) -> str:
    """Which layer a tensor of a ViT image tower belongs to: "embedding", "block N" or "head"."""
    m = re.search(r"(?:resblocks|layers?|blocks)\.(\d+)\.", key)
    if m:
        return f"block {int(m.group(1))}"
    if re.search(r"(ln_post|post_layernorm|^proj$|\.proj$|projection)", key):
        return "head"
    return "embedding"


def kind_of(key: str) -> str:
    """What a tensor does: "attention", "mlp", "norm", "embedding" or "projection"."""
    if re.search(r"(attn|attention)", key):
        return "attention"
    if re.search(r"(mlp|c_fc|c_proj|fc1|fc2)", key):
        return "mlp"
    if re.search(r"(ln_|norm)", key):
        return "norm"
    if layer_of(key) == "head":
        return "projection"
    return "embedding"


def layer_order(layers) -> list:
    """Layer names in network order: embedding, block 0, block 1, …, head."""
    def rank(name):
        if name == "embedding":
            return -1
        if name == "head":
            return 10**9
        return int(name.split()[-1])

    return sorted(set(layers), key=rank)


def weight_drift(pretrained: dict, finetuned, names) -> pd.DataFrame:
    """One row per (task, tensor): task, tensor, layer, kind, numel, change ‖θ_t − θ0‖, norm ‖θ0‖, relative = change / norm."""
    rows = []
    for name, ft in zip(names, finetuned, strict=True):
        for k, w0 in pretrained.items():
            w0 = w0.double()
            change = float((ft[k].double() - w0).norm())
            norm = float(w0.norm())
            rows.append({"task": name, "tensor": k, "layer": layer_of(k), "kind": kind_of(k), "numel": w0.numel(),
                         "change": change, "norm": norm, "relative": change / norm if norm else float("nan")})
    return pd.DataFrame(rows)


def layer_drift(drift: pd.DataFrame) -> pd.DataFrame:
    """Per task and layer, ‖θ_t − θ0‖ / ‖θ0‖ over the layer's tensors together (squared norms add); layers in network order."""
    sq = drift.assign(change2=drift["change"] ** 2, norm2=drift["norm"] ** 2)
    out = sq.groupby(["task", "layer"], as_index=False, sort=False)[["change2", "norm2"]].sum()
    out["relative"] = (out["change2"] / out["norm2"]) ** 0.5
    order = {name: i for i, name in enumerate(layer_order(out["layer"]))}
    tasks = {name: i for i, name in enumerate(dict.fromkeys(drift["task"]))}
    out = out.sort_values(["task", "layer"], key=lambda s: s.map(tasks if s.name == "task" else order))
    return out[["task", "layer", "relative"]].reset_index(drop=True)


def total_drift(drift: pd.DataFrame) -> pd.Series:
    """Per task (in the table's order), ‖θ_t − θ0‖ / ‖θ0‖ over the whole tower."""
    sq = drift.assign(change2=drift["change"] ** 2, norm2=drift["norm"] ** 2)
    sums = sq.groupby("task", sort=False)[["change2", "norm2"]].sum()
    return (sums["change2"] / sums["norm2"]) ** 0.5


def storage(suite) -> pd.DataFrame:
    """What serving the suite's T tasks stores, in parameters and megabytes (float32): one tower, T towers, LoRA, heads."""
    n = sum(v.numel() for v in suite.pretrained.values())
    T = len(suite.tasks)
    lora = sum(b.numel() + a.numel() for task in suite.lora for b, a in task.values())
    heads = sum(h.numel() for h in suite.heads)
    rows = [("one image tower (θ0, or one merged model)", n),
            (f"{T} fully fine-tuned image towers", T * n),
            (f"θ0 + {T} LoRA adapters", n + lora),
            (f"{T} zero-shot heads (frozen, shared by every method)", heads)]
    df = pd.DataFrame(rows, columns=["stored", "parameters"])
    df["megabytes"] = df["parameters"] * 4 / MEGABYTE
    df["times_one_tower"] = df["parameters"] / n
    return df
