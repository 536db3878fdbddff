"""Interactive panels: pure update functions, with ipywidgets on top (work headless too)."""
import matplotlib.pyplot as plt
import torch
from IPython.display import display

from . import merging
from .evaluation import accuracy


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


def byom_accuracies(fast: FastByom, m_percent: float, base: str = "task_arithmetic", tasks=None,
                    split: str = "test", limit: int = None) -> dict:
    """{task: accuracy} of BYOM-FFT (or post-pruning as base) at m%, on the first `limit` images."""
    suite = fast.suite
    names = suite.tasks if tasks is None else list(tasks)
    if not names:
        raise ValueError("select at least one task")
    out = {}
    for name in names:
        t = suite.task_index(name)
        out[name] = accuracy(suite, fast.task_state_dict(base, t, m_percent / 100), t, split, limit=limit)
    return out


def plot_byom_panel(accs: dict, reference: dict, m_percent: float, base: str):
    """Bar chart of per-task accuracy at m% next to each task's fine-tuned accuracy."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(accs)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [100 * reference[n] for n in names], width=0.4, label="fine-tuned", color="0.75")
    ax.bar([x + 0.2 for x in xs], [100 * accs[n] for n in names], width=0.4, label=f"{base} + top {m_percent:g}%")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    mean = 100 * sum(accs.values()) / len(accs)
    ax.set_title(f"m = {m_percent:g}%: mean accuracy {mean:.1f}%")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


class ByomPanel:
    """m% slider, base-merger dropdown and task checkboxes; each change re-evaluates and redraws."""

    def __init__(self, suite, bases=("task_arithmetic", "simple_average", "ties", "post_pruning"), lam: float = 0.3,
                 split: str = "test", limit: int = 40):
        import ipywidgets as w

        self.fast, self.split, self.limit = FastByom(suite, lam), split, limit
        self.reference = {n: accuracy(suite, suite.finetuned[t], t, split, limit=limit) for t, n in enumerate(suite.tasks)}
        self.m = w.FloatLogSlider(value=5, base=10, min=-1, max=2, step=0.1, description="m (%)", continuous_update=False)
        self.base = w.Dropdown(options=list(bases), value=bases[0], description="base")
        self.checks = [w.Checkbox(value=True, description=n, indent=False) for n in suite.tasks]
        self.out = w.Output()
        for control in [self.m, self.base, *self.checks]:
            control.observe(lambda _: self.refresh(), names="value")
        self.widget = w.VBox([w.HBox([self.m, self.base]), w.HBox(self.checks, layout=w.Layout(flex_flow="row wrap")), self.out])
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
            accs = byom_accuracies(self.fast, self.m.value, self.base.value, tasks, self.split, self.limit)
            self.last = accs
            self.message = f"m = {self.m.value:g}%: mean accuracy {100 * sum(accs.values()) / len(accs):.1f}%"
            fig = plot_byom_panel(accs, self.reference, self.m.value, self.base.value)
            display(fig)
            plt.close(fig)
