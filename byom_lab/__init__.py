"""byom-lab: a teaching and analysis toolkit for data-free model merging (BYOM, arXiv 2310.01886)."""
from ._compat import fix_torchvision

fix_torchvision()  # before anything imports torchvision (open_clip does)

from .evaluation import eval_device as device  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .suite import Suite  # noqa: E402
from .suites import load_suite  # noqa: E402

__all__ = ["Suite", "device", "evaluate", "list_methods", "load_suite", "merging", "setup"]
__version__ = "0.1.0"


def __getattr__(name):
    # the merging core is imported on first use, so data and suite code load without it
    if name == "merging":
        import importlib

        return importlib.import_module(".merging", __name__)
    if name == "list_methods":
        return list_methods
    raise AttributeError(f"module 'byom_lab' has no attribute {name!r}")


def list_methods(inputs=None) -> list:
    """Every registered method: the data-free ones of `merging` and the test-time ones of `adaptation`.

    Args:
        inputs: only methods taking these inputs ("finetuned", "lora", "statistics", "test images").
    """
    import importlib

    importlib.import_module(".adaptation", __name__)  # registers AdaMerging and Model Tinting
    return importlib.import_module(".merging", __name__).list_methods(inputs)


def setup(seed: int = 0, threads: int = None) -> None:
    """Seed torch (and python/numpy) for a notebook, keep its figures small; optionally set the CPU thread count."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    import matplotlib

    matplotlib.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72})  # stored lesson figures stay small
