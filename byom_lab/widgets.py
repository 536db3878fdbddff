"""Interactive panels: pure update functions, with ipywidgets on top (work headless too)."""
import matplotlib.pyplot as plt
import torch
from IPython.display import display

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


def plot_byom_panel(accs: dict, reference: dict, merger: str, setting: str, label: str = "fine-tuned"):
    """Bar chart of per-task accuracy of `merger` at `setting` (e.g. "m = 5%") next to each task's reference."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(accs)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [100 * reference[n] for n in names], width=0.4, label=label, color="0.75")
    ax.bar([x + 0.2 for x in xs], [100 * accs[n] for n in names], width=0.4, label=f"{merger}, {setting}")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    mean = 100 * sum(accs.values()) / len(accs)
    ax.set_title(f"{setting}: mean accuracy {mean:.1f}%")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


class _Panel:
    """Controls above task checkboxes and an output; any change re-evaluates the ticked tasks and redraws.

    Subclasses set `reference` (and `reference_label`), call `_build(suite, controls)`, and define
    `evaluate(tasks)` (-> {task: accuracy}) and `setting()` (-> (merger label, setting label)).
    """

    reference_label = "fine-tuned"

    def _build(self, suite, controls) -> None:
        import ipywidgets as w

        self.checks = [w.Checkbox(value=True, description=n, indent=False) for n in suite.tasks]
        self.out = w.Output()
        for control in [*controls, *self.checks]:
            control.observe(lambda _: self.refresh(), names="value")
        self.widget = w.VBox([w.HBox(controls), w.HBox(self.checks, layout=w.Layout(flex_flow="row wrap")), self.out])
        self.last, self.message = None, ""
        self.refresh()

    def refresh(self):
        tasks = [c.description for c in self.checks if c.value]
        self.out.clear_output(wait=True)
        with self.out:
            if not tasks:
                self.last, self.message = None, "select at least one task"
                print(self.message)
                return
            self.last = self.evaluate(tasks)
            merger, setting = self.setting()
            self.message = f"{setting}: mean accuracy {100 * sum(self.last.values()) / len(self.last):.1f}%"
            fig = plot_byom_panel(self.last, self.reference, merger, setting, label=self.reference_label)
            display(fig)
            plt.close(fig)


class ByomPanel(_Panel):
    """m% slider, base-merger dropdown and task checkboxes; each change re-evaluates and redraws."""

    def __init__(self, suite, bases=("task_arithmetic", "simple_average", "ties", "post_pruning"), lam: float = 0.3,
                 split: str = "test", limit: int = 40):
        import ipywidgets as w

        self.fast, self.split, self.limit = FastByom(suite, lam), split, limit
        self.reference = {n: accuracy(suite, suite.finetuned[t], t, split, limit=limit) for t, n in enumerate(suite.tasks)}
        self.m = w.FloatLogSlider(value=5, base=10, min=-1, max=2, step=0.1, description="m (%)", continuous_update=False)
        self.base = w.Dropdown(options=list(bases), value=bases[0], description="base")
        self._build(suite, [self.m, self.base])

    def evaluate(self, tasks) -> dict:
        return byom_accuracies(self.fast, self.m.value, self.base.value, tasks, self.split, self.limit)

    def setting(self) -> tuple[str, str]:
        return self.base.value, f"m = {self.m.value:g}%"


class FastLora:
    """BYOM-LoRA (base "pretrained") at any q from one SVD per task and matrix, computed once."""

    def __init__(self, suite):
        if not suite.lora:
            raise ValueError(f"suite {suite.name!r} has no LoRA fine-tunes")
        self.suite = suite
        self.svd = [{k: merging.factored_svd(b, a) for k, (b, a) in lora.items()} for lora in suite.lora]
        self.max_rank = min(len(s) for task in self.svd for _, s, _ in task.values())

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


class LoraPanel(_Panel):
    """q slider and task checkboxes for BYOM-LoRA; each change re-evaluates and redraws."""

    reference_label = "LoRA fine-tuned"

    def __init__(self, suite, split: str = "test", limit: int = 40):
        import ipywidgets as w

        self.fast, self.split, self.limit = FastLora(suite), split, limit
        full = [apply_lora(suite.pretrained, lora) for lora in suite.lora]
        self.reference = {n: accuracy(suite, full[t], t, split, limit=limit) for t, n in enumerate(suite.tasks)}
        self.q = w.IntSlider(value=1, min=1, max=self.fast.max_rank, description="q", continuous_update=False)
        self._build(suite, [self.q])

    def evaluate(self, tasks) -> dict:
        return lora_accuracies(self.fast, self.q.value, tasks, self.split, self.limit)

    def setting(self) -> tuple[str, str]:
        return "BYOM-LoRA", f"q = {self.q.value}"
