"""The tiny CLIP: open_clip model from a custom config, image-tower helpers and zero-shot heads."""
import json
import logging
from pathlib import Path

import torch

from ._compat import fix_torchvision

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_MODEL = "byom-tiny-clip"
MEAN, STD = 0.5, 0.25


def open_clip():
    """Import open_clip (after the torchvision fix) with byom-lab's model configs registered."""
    fix_torchvision()
    import open_clip as oc

    if TINY_MODEL not in oc.list_models():
        oc.add_model_config(CONFIG_DIR)
    return oc


def tiny_config() -> dict:
    return json.loads((CONFIG_DIR / f"{TINY_MODEL}.json").read_text())


def create_tiny_clip(seed: int = 0):
    """A freshly initialised tiny CLIP (deterministic for a seed)."""
    oc = open_clip()
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip warns "no pretrained weights"; ours are loaded next
    try:
        return oc.create_model(TINY_MODEL, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)


def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> normalised float32."""
    return (images_uint8.float() / 255.0 - MEAN) / STD


def visual_state_dict(model) -> dict:
    """The image tower's float tensors (what is fine-tuned and merged), detached copies."""
    return {k: v.detach().clone() for k, v in model.visual.state_dict().items() if v.is_floating_point()}


def encode_images(visual, images: torch.Tensor, state_dict=None) -> torch.Tensor:
    """L2-normalised image features; with state_dict, the tower runs with those weights."""
    if state_dict is None:
        feats = visual(images)
    else:
        feats = torch.func.functional_call(visual, state_dict, (images,), strict=False)
    return torch.nn.functional.normalize(feats, dim=-1)


@torch.no_grad()
def zeroshot_head(model, tokenizer, classes, family: str, templates) -> torch.Tensor:
    """(n_classes, embed_dim) head: mean of normalised text features over templates, renormalised."""
    rows = []
    for c in classes:
        texts = [t.format(c=c, f=family) for t in templates]
        feats = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        rows.append(torch.nn.functional.normalize(feats.mean(0), dim=-1))
    return torch.stack(rows)
