"""Every suite by name: `load_suite` dispatches to the tiny loader or the paper loader."""
from . import manifest as mf
from .finetune import FinetuneConfig
from .suite import Suite


def suite_names() -> list:
    """Names `load_suite` accepts: the manifest's tiny suites, then "paper"."""
    return sorted(mf.suites()) + ["paper"]


def load_suite(name: str = "tiny", tasks=None, finetune: FinetuneConfig = None, max_train: int = None,
               **paper_kwargs) -> Suite:
    """Build (first call, cached) or load a suite.

    Args:
        name: "tiny", "tiny-similar", "tiny-dissimilar" (or "paper", see byom_lab.paper).
        tasks: optional subset of the suite's task names, in the suite's order.
        finetune: fine-tuning hyperparameters (defaults to FinetuneConfig()).
        max_train: use only the first max_train training images per task (quick reduced suites).
        **paper_kwargs: for "paper" only, passed to byom_lab.paper.load_paper_suite.
    """
    if name == "paper":
        from .paper import load_paper_suite  # open_clip's big models and PIL: only when asked for

        return load_paper_suite(tasks=tasks, **paper_kwargs)
    if name not in mf.suites():
        raise ValueError(f"unknown suite {name!r}; valid suites: {suite_names()}")
    from .tiny.suite import load_tiny_suite

    return load_tiny_suite(name, tasks=tasks, finetune=finetune, max_train=max_train)
