"""Interactive panels: pure update functions, with ipywidgets on top (work headless too)."""
import matplotlib.pyplot as plt
from IPython.display import display

from .evaluation import accuracy
from .plots import method_label, percent, plot_byom_panel
from .precomputed import FastByom, FastLora, byom_accuracies, lora_accuracies


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
        self.m = w.FloatLogSlider(value=5, base=10, min=-1, max=2, step=0.1, description="m (%)", readout_format=".2g",
                                  continuous_update=False)
        self.base = w.Dropdown(options=[(method_label(b), b) for b in bases], value=bases[0], description="base")
        self._build(suite, [self.m, self.base])

    def evaluate(self, tasks) -> dict:
        return byom_accuracies(self.fast, self.m.value, self.base.value, tasks, self.split, self.limit)

    def setting(self) -> tuple[str, str]:
        base = self.base.value
        merger = method_label(base) if base == "post_pruning" else f"BYOM-FFT (base: {method_label(base)})"
        return merger, f"m = {percent(self.m.value)}%"


class LoraPanel(_Panel):
    """q slider and task checkboxes for BYOM-LoRA; each change re-evaluates and redraws."""

    reference_label = "LoRA fine-tuned"

    def __init__(self, suite, split: str = "test", limit: int = 40):
        import ipywidgets as w

        self.fast, self.split, self.limit = FastLora(suite), split, limit
        self.reference = {n: accuracy(suite, self.fast.lora_model(t), t, split, limit=limit) for t, n in enumerate(suite.tasks)}
        self.q = w.IntSlider(value=1, min=1, max=self.fast.max_rank, description="q", continuous_update=False)
        self._build(suite, [self.q])

    def evaluate(self, tasks) -> dict:
        return lora_accuracies(self.fast, self.q.value, tasks, self.split, self.limit)

    def setting(self) -> tuple[str, str]:
        return "BYOM-LoRA", f"q = {self.q.value}"
