"""BYOM-FFT and BYOM-LoRA at any m or q, from work done once per suite (behind the widget panels).

`FastByom` keeps θ* and each task's residual with its magnitudes sorted, so a new m is one
threshold lookup and one masked add per task; `FastLora` keeps one SVD per task and matrix, so a
new q only slices it. Both agree with `byom_lab.merging` (tests/test_analysis.py).
"""
import torch

from . import merging
from .evaluation import accuracy
from .finetune import apply_lora


class FastByom:
    """BYOM-FFT / post-pruning at any m without redoing what does not depend on m.

    Per base merger it keeps θ* and, per task, u_t = θ_t − θ* flattened with its magnitudes sorted
    once; a new m is then one threshold lookup and one masked add per task.
    """

    def __init__(self, suite, lam: float = 0.3):
        self.suite, self.lam = suite, lam
        self.keys = list(suite.pretrained)
        self.shapes = [suite.pretrained[k].shape for k in self.keys]
        self._bases = {}

    def _flat(self, sd):
        return torch.cat([sd[k].reshape(-1).float() for k in self.keys])

    def _unflat(self, flat):
        out, i = {}, 0
        for k, shape in zip(self.keys, self.shapes):
            n = shape.numel()
            out[k] = flat[i:i + n].view(shape)
            i += n
        return out

    def prepare(self, base: str):
        """θ*, residuals and sorted magnitudes for `base` ("post_pruning" means θ* = θ0)."""
        if base not in self._bases:
            s = self.suite
            if base == "post_pruning":
                merged = s.pretrained
            else:
                kwargs = {"lam": self.lam} if base in ("task_arithmetic", "ties") else {}
                merged = merging.get_method(base)(s.pretrained, s.finetuned, **kwargs)
                merged = merged.merged if hasattr(merged, "merged") else merged
            anchor = self._flat(merged)
            residuals = [self._flat(ft) - anchor for ft in s.finetuned]
            ordered = [r.abs().sort(descending=True).values for r in residuals]
            self._bases[base] = (anchor, residuals, ordered)
        return self._bases[base]

    def task_state_dict(self, base: str, t: int, density: float) -> dict:
        """θ* + top(θ_t − θ*, density) (global scope) as a state dict."""
        if not 0 < density <= 1:
            raise ValueError(f"density must lie in (0, 1], got {density}")
        anchor, residuals, ordered = self.prepare(base)
        k = max(1, round(density * len(anchor)))
        threshold = ordered[t][k - 1]
        r = residuals[t]
        return self._unflat(anchor + torch.where(r.abs() >= threshold, r, torch.zeros(())))


def _task_names(suite, tasks) -> list:
    """The selected task names (all of the suite's when None); an empty selection is an error."""
    names = suite.tasks if tasks is None else list(tasks)
    if not names:
        raise ValueError("select at least one task")
    return names


def byom_accuracies(fast: FastByom, m_percent: float, base: str = "task_arithmetic", tasks=None,
                    split: str = "test", limit: int = None) -> dict:
    """{task: accuracy} of BYOM-FFT (or post-pruning as base) at m%, on the first `limit` images."""
    suite = fast.suite
    out = {}
    for name in _task_names(suite, tasks):
        t = suite.task_index(name)
        out[name] = accuracy(suite, fast.task_state_dict(base, t, m_percent / 100), t, split, limit=limit)
    return out


class FastLora:
    """BYOM-LoRA (base "pretrained") at any q from one SVD per task and matrix, computed once."""

    def __init__(self, suite):
        if not suite.lora:
            raise ValueError(f"suite {suite.name!r} has no LoRA fine-tunes")
        self.suite = suite
        self.svd = [{k: merging.factored_svd(b, a) for k, (b, a) in lora.items()} for lora in suite.lora]
        self.max_rank = min(len(s) for task in self.svd for _, s, _ in task.values())

    def lora_model(self, t: int) -> dict:
        """θ0 + B_t A_t: task t's LoRA fine-tuned model (what q = r gives back)."""
        return apply_lora(self.suite.pretrained, self.suite.lora[t])

    def task_state_dict(self, t: int, rank: int) -> dict:
        """θ0 + U_q Σ_q V_qᵀ for every adapted matrix of task t."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must lie in 1..{self.max_rank}, got {rank}")
        out = dict(self.suite.pretrained)
        for k, (u, s, v) in self.svd[t].items():
            out[k] = out[k] + (u[:, :rank] * s[:rank]) @ v[:, :rank].T
        return out


def lora_accuracies(fast: FastLora, rank: int, tasks=None, split: str = "test", limit: int = None) -> dict:
    """{task: accuracy} of BYOM-LoRA at rank q on the first `limit` images of each task."""
    suite = fast.suite
    return {n: accuracy(suite, fast.task_state_dict(suite.task_index(n), rank), n, split, limit=limit)
            for n in _task_names(suite, tasks)}
