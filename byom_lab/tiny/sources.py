"""Task data of the tiny suite: generator registry and deterministic train/val/test splits."""
import torch

from .. import manifest as mf
from ..suite import SPLITS
from . import scenery, symbols

GENERATORS = {
    "scenes": scenery.scenes, "cars": scenery.cars, "aerial": scenery.aerial, "landcover": scenery.landcover,
    "street_digits": symbols.street_digits, "signs": symbols.signs, "textures": symbols.textures,
}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def _balanced_labels(n: int, n_classes: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.arange(n) % n_classes
    return labels[torch.randperm(n, generator=g)]


def _digits_splits(spec: mf.TaskSpec) -> dict:
    images, labels, raw = symbols.handwritten_digits()
    expected = mf.manifest()["tiny"]["tasks"][spec.name].get("sha256")
    mf.check_sha256("scikit-learn load_digits", mf.sha256_bytes(raw.numpy().tobytes()), expected)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(spec.seed))
    out, start = {}, 0
    for split in SPLITS:
        idx = order[start:start + spec.sizes[split]]
        start += spec.sizes[split]
        out[split] = (to_uint8(images[idx]), labels[idx])
    return out


def make_splits(spec: mf.TaskSpec) -> dict:
    """{split: (uint8 images (n, 3, 32, 32), labels (n,))} for one task, deterministic from its seed."""
    if spec.parent:
        parent = make_splits(mf.tiny_tasks()[spec.parent])
        remap = {c: i for i, c in enumerate(spec.class_subset)}
        out = {}
        for split, (x, y) in parent.items():
            keep = torch.tensor([int(v) in remap for v in y])
            out[split] = (x[keep], torch.tensor([remap[int(v)] for v in y[keep]], dtype=torch.long))
        return out
    if spec.generator == "handwritten_digits":
        return _digits_splits(spec)
    if spec.generator not in GENERATORS:
        raise ValueError(f"task {spec.name!r}: unknown generator {spec.generator!r}; known: {sorted(GENERATORS)}")
    out = {}
    for k, split in enumerate(SPLITS):
        g = torch.Generator().manual_seed(spec.seed * 1000 + k)
        labels = _balanced_labels(spec.sizes[split], len(spec.classes), g)
        out[split] = (to_uint8(GENERATORS[spec.generator](labels, g)), labels)
    return out
