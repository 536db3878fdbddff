"""Model Tinting: layer-wise λ plus one trainable head per task, fitted to the individual models' pseudo-labels (arXiv 2412.19098).

    θ(λ)   = θ0 + Σ_t λ_t,l v_t,l                 λ init 0.3, clamped to [0, 1] (as layer-wise AdaMerging)
    W_t    ← s·h_t                                 task t's head, initialised from its zero-shot head (logit scale s folded in)
    ŷ, c   = argmax, max of softmax(s·f(x; θ_t) h_tᵀ)   pseudo-label and confidence of task t's own fine-tuned model
    loss_t = CE(f(x; θ(λ)) W_tᵀ, ŷ)               f L2-normalised; one batch of 32 test images of one task per step
    Tinting++ keeps only the images where the merged prediction agrees with ŷ or the individual
    model is at least as confident (c ≥ merged confidence); an empty selection skips the step.

Adam (lr 1e-2) over λ and the heads together; tasks in shuffled order each epoch, one optimiser
step per task, as the reference code (AIM-SKKU, losstype crosspseudo / crosspseudoconf). The
reference trains 500 epochs (4,000 steps on 8 tasks); the default here is fewer (`REFERENCE`).
Its heads also carry a bias (initialised at 0); these are bias-free, as `bl.evaluate`'s heads are.
"""
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from ..evaluation import eval_device
from ..merging import task_vectors
from ..merging.registry import register
from .adamerging import images_used, result_from
from .results import TintingResult
from .runs import cached_run
from .weights import TaskVectorStack, adaptation_images, check_positive, features


@dataclass(frozen=True)
class TintingConfig:
    """Settings of one Model Tinting run (defaults for the tiny suite; `REFERENCE` holds the reference code's)."""

    plus: bool = False  # Tinting++: confidence-based selection of the pseudo-labels
    epochs: int = 40  # each epoch is one step per task
    lr: float = 1e-2
    batch_size: int = 32
    init: float = 0.3  # initial λ
    train_lambdas: bool = True  # False: λ stays at init and only the heads train
    seed: int = 0

    def __post_init__(self):
        check_positive(self.epochs, "epochs")
        check_positive(self.batch_size, "batch_size")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.init, (int, float)) and 0 <= self.init <= 1):
            raise ValueError(f"init must be a λ in [0, 1], got {self.init!r}")


REFERENCE = dict(epochs=500)  # the reference code's settings that differ from the defaults


def tinting_loss(logits: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, plus: bool) -> tuple[torch.Tensor, int]:
    """(cross-entropy against the pseudo-labels, images used); Tinting++ uses only the confident selection.

    Args:
        logits: (batch, classes) of the merged model with the trainable head.
        labels: (batch,) pseudo-labels ŷ of the individual model.
        confidence: (batch,) the individual model's max softmax probability c.
        plus: apply Tinting++'s selection; an empty selection gives a zero loss (no NaN) and count 0.
    """
    if not plus:
        return F.cross_entropy(logits, labels), len(labels)
    with torch.no_grad():
        merged_confidence, merged_label = logits.softmax(-1).max(-1)
        keep = (merged_label == labels) | (confidence >= merged_confidence)
    kept = int(keep.sum())
    if kept == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits[keep], labels[keep]), kept


@torch.no_grad()
def pseudo_labels(suite, t: int, images: torch.Tensor, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŷ, c): argmax and max softmax probability of task t's individual fine-tuned model on `images`."""
    device = images.device
    sd = {k: v.to(device) for k, v in suite.finetuned[t].items()}
    head = suite.logit_scale * suite.heads[t].to(device)
    probs = torch.cat([(features(suite.visual.to(device), sd, images[i:i + batch_size]) @ head.T).softmax(-1)
                       for i in range(0, len(images), batch_size)])
    confidence, labels = probs.max(-1)
    return labels, confidence


def _train(suite, cfg: TintingConfig, part: str) -> tuple[dict, dict]:
    device = eval_device()
    stack = TaskVectorStack(suite.pretrained, task_vectors(suite.pretrained, suite.finetuned), device)
    rows, T = len(stack.keys), stack.num_tasks
    raw = torch.full((rows, T), float(cfg.init), device=device, requires_grad=cfg.train_lambdas)
    heads = [(suite.logit_scale * h.to(device)).clone().requires_grad_(True) for h in suite.heads]
    opt = torch.optim.Adam(([raw] if cfg.train_lambdas else []) + heads, lr=cfg.lr)
    images = [adaptation_images(suite, t, part).to(device) for t in range(T)]
    targets = [pseudo_labels(suite, t, x) for t, x in enumerate(images)]  # the individual models, once per image
    visual, g = suite.visual.to(device), torch.Generator().manual_seed(cfg.seed)
    if not cfg.train_lambdas:  # θ(λ) is fixed: its features are too, so compute them once and train the heads on them
        with torch.no_grad():
            fixed = stack.weights(raw.clamp(0, 1))
            images = [torch.cat([features(visual, fixed, x[i:i + 250]) for i in range(0, len(x), 250)]) for x in images]
    history, skipped = [], 0
    for _ in range(cfg.epochs):
        for t in torch.randperm(T, generator=g).tolist():
            idx = torch.randperm(len(images[t]), generator=g)[: cfg.batch_size].to(device)
            feats = features(visual, stack.weights(raw.clamp(0, 1)), images[t][idx]) if cfg.train_lambdas else images[t][idx]
            logits = feats @ heads[t].T
            loss, kept = tinting_loss(logits, targets[t][0][idx], targets[t][1][idx], cfg.plus)
            if kept == 0:  # nothing confident to learn from: no step, as no gradient
                skipped += 1
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    tensors = {"lambdas": raw.detach().clamp(0, 1), "history": torch.tensor(history),
               **{f"head.{t}": h.detach() for t, h in enumerate(heads)}}
    return tensors, {"steps": cfg.epochs * T - skipped, "skipped_steps": skipped, "init": cfg.init}


def _run(suite, cfg: TintingConfig, part: str) -> TintingResult:
    tensors, info = cached_run("tinting", suite, asdict(cfg), part, lambda: _train(suite, cfg, part))
    info = {**info, "split": "test (unlabeled)", "part": part, "images": images_used(suite, part), "config": asdict(cfg),
            "uses": "the individual fine-tuned models (pseudo-labels) at adaptation time"}
    heads = [tensors[f"head.{t}"].float() for t in range(len(suite.tasks))]
    vectors = task_vectors(suite.pretrained, suite.finetuned)
    return result_from(suite, vectors, tensors, info, TintingResult, heads=heads)


@register("tinting", inputs="test images")
def tinting(suite, config: TintingConfig = None, part: str = "all", **options) -> TintingResult:
    """Model Tinting (arXiv 2412.19098): layer-wise λ plus one head per task, on the individual models' pseudo-labels.

    Args:
        suite: a loaded Suite (θ0, θ_t, zero-shot heads, test images).
        config: a TintingConfig (defaults as documented there); `**options` override its fields,
            e.g. plus=True, epochs=500, train_lambdas=False.
        part: which test images to adapt on, "all" (the paper's protocol) or "first_half".

    Returns:
        TintingResult: `.merged` = θ(λ), `.task_head(t)` = task t's trained head (used by `bl.evaluate`),
        `.lambdas`, `.history`, `.info` (steps, skipped steps, images, measured seconds).
    """
    return _run(suite, replace(config or TintingConfig(), **options), part)


@register("tinting_plus", inputs="test images")
def tinting_plus(suite, config: TintingConfig = None, part: str = "all", **options) -> TintingResult:
    """Tinting++ (arXiv 2412.19098): Model Tinting with confidence-based selection of the pseudo-labels."""
    return _run(suite, replace(config or TintingConfig(), plus=True, **options), part)
