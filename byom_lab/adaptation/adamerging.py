"""AdaMerging: learn the merging coefficients λ on unlabeled test images by entropy minimisation (arXiv 2310.02575).

    θ(λ)  = θ0 + Σ_t λ_t,l v_t,l        λ clamped to [0, 1]; one λ per task ("task") or per task and tensor ("layer")
    loss  = Σ_t mean_{x ∈ B_t} H(softmax(s·f(x; θ(λ)) h_tᵀ))     H entropy, h_t the frozen zero-shot head,
                                                                   B_t a random batch of task t's test images
    AdaMerging++ replaces v_t by TIES's trimmed (20%), sign-elected vectors.

Adam (lr 1e-3), 16 images per task per step, as the reference code (EnnengYang/AdaMerging). Its
defaults differ here in two ways, each one option away (`REFERENCE`): the number of steps (500 in
the reference; fewer here, so a run fits ~3 minutes on 2 CPU cores) and the initial λ (0.3 in the
reference, CLIP's usual task-arithmetic λ; here the task-arithmetic λ chosen on validation). The
reference loop also sums two batches of 16 per task per step (`if i > 0: break`); this one takes one.
"""
from dataclasses import asdict, dataclass, replace

import torch

from ..evaluation import eval_device
from ..merging import task_vectors
from ..merging.checks import check_choice, check_density
from ..merging.registry import register
from .results import AdaMergingResult
from .runs import cached_run
from .weights import TaskVectorStack, adaptation_images, check_positive, features, ties_vectors


@dataclass(frozen=True)
class AdaMergingConfig:
    """Settings of one AdaMerging run (defaults for the tiny suite; `REFERENCE` holds the reference code's)."""

    granularity: str = "layer"  # "task": one λ per task; "layer": one per task and tensor
    plus: bool = False  # AdaMerging++: TIES-trimmed, sign-elected task vectors
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16  # unlabeled test images per task per step
    init: float | None = None  # initial λ; None: task arithmetic's (TIES-sum's for ++) λ chosen on validation
    density: float = 0.2  # ++ only: share of each task vector TIES keeps
    seed: int = 0

    def __post_init__(self):
        check_choice(self.granularity, "granularity", ("task", "layer"))
        check_positive(self.steps, "steps")
        check_positive(self.batch_size, "batch_size")
        check_density(self.density)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.init is not None and not (isinstance(self.init, (int, float)) and 0 <= self.init <= 1):
            raise ValueError(f"init must be None or a λ in [0, 1], got {self.init!r}")


REFERENCE = dict(steps=500, init=0.3)  # the reference code's settings that differ from the defaults


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def initial_lambda(suite, cfg: AdaMergingConfig) -> float:
    """cfg.init, or the λ chosen on validation for task arithmetic (for TIES with merge "sum" under ++)."""
    if cfg.init is not None:
        return float(cfg.init)
    from ..selection import select_lambda  # selection imports merging, which registers this module: import late

    if cfg.plus:
        return select_lambda(suite, "ties", density=cfg.density, merge="sum")[0]
    return select_lambda(suite, "task_arithmetic")[0]


def _vectors(suite, cfg: AdaMergingConfig) -> list[dict]:
    vectors = task_vectors(suite.pretrained, suite.finetuned)
    return ties_vectors(vectors, cfg.density) if cfg.plus else vectors


def _train(suite, cfg: AdaMergingConfig, part: str, init: float) -> tuple[dict, dict]:
    """Adam on raw λ, clamped in the forward; returns ({"lambdas": (tensors, tasks)}, info)."""
    device = eval_device()
    stack = TaskVectorStack(suite.pretrained, _vectors(suite, cfg), device)
    rows, T = len(stack.keys), stack.num_tasks
    raw = torch.full((rows if cfg.granularity == "layer" else 1, T), init, device=device, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=cfg.lr)
    images = [adaptation_images(suite, t, part).to(device) for t in range(T)]
    heads = [suite.logit_scale * h.to(device) for h in suite.heads]  # frozen zero-shot heads, logit scale folded in
    visual, g = suite.visual.to(device), torch.Generator().manual_seed(cfg.seed)
    history = []
    for _ in range(cfg.steps):
        picks = [x[torch.randperm(len(x), generator=g)[: cfg.batch_size].to(device)] for x in images]
        feats = features(visual, stack.weights(raw.clamp(0, 1).expand(rows, T)), torch.cat(picks))
        loss = sum(entropy(f @ h.T).mean() for f, h in zip(feats.split([len(p) for p in picks]), heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    lambdas = raw.detach().clamp(0, 1).expand(rows, T).contiguous()
    return {"lambdas": lambdas, "history": torch.tensor(history)}, {"steps": cfg.steps, "init": init}


def images_used(suite, part: str) -> int:
    """How many unlabeled test images (all tasks together) a run on `part` adapts on."""
    return sum(len(adaptation_images(suite, t, part)) for t in range(len(suite.tasks)))


def result_from(suite, vectors: list[dict], tensors: dict, info: dict, cls=AdaMergingResult, **extra):
    """The result object from a run's stored tensors: θ(λ) rebuilt from θ0, the task vectors and λ."""
    stack = TaskVectorStack(suite.pretrained, vectors)
    lambdas = tensors["lambdas"].float()
    with torch.no_grad():
        merged = {k: v.contiguous() for k, v in stack.weights(lambdas).items()}
    return cls(merged, lambdas, stack.keys, tensors["history"].tolist(), info, **extra)


@register("adamerging", inputs="test images")
def adamerging(suite, config: AdaMergingConfig = None, part: str = "all", **options) -> AdaMergingResult:
    """AdaMerging (arXiv 2310.02575): λ learned by entropy minimisation on the unlabeled test images.

    Args:
        suite: a loaded Suite (θ0, θ_t, zero-shot heads, test images).
        config: an AdaMergingConfig (defaults as documented there); `**options` override its fields,
            e.g. granularity="task", plus=True, steps=500, init=0.3.
        part: which test images to adapt on, "all" (the papers' protocol) or "first_half"
            (score on the second half for a held-out number).

    Returns:
        AdaMergingResult: `.merged` = θ(λ) (used for every task), `.lambdas`, `.history`, and `.info`
        with the steps, images per task and the measured seconds (kept with the cached run).
    """
    cfg = replace(config or AdaMergingConfig(), **options)
    init = initial_lambda(suite, cfg)
    settings = {**asdict(cfg), "init": init}
    tensors, info = cached_run("adamerging", suite, settings, part, lambda: _train(suite, cfg, part, init))
    info = {**info, "split": "test (unlabeled)", "part": part, "images": images_used(suite, part), "config": asdict(cfg)}
    return result_from(suite, _vectors(suite, cfg), tensors, info)


@register("adamerging_plus", inputs="test images")
def adamerging_plus(suite, config: AdaMergingConfig = None, part: str = "all", **options) -> AdaMergingResult:
    """AdaMerging++ (arXiv 2310.02575): AdaMerging on TIES-trimmed, sign-elected task vectors."""
    return adamerging(suite, config, part, **{"plus": True, **options})
