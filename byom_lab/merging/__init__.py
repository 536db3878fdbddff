"""byom_lab.merging: data-free model merging as pure functions over state dicts.

Every method takes `dict[str, Tensor]` state dicts (θ0 and one θ_t per task) and returns a merged
state dict or a result object holding the shared model and per-task extras. Methods are
registered by name: `list_methods()`, `get_method(name)`.
"""
from . import textbook
from .emr import EMRResult, emr
from .family import dare, simple_average, task_arithmetic, ties
from .general import MergeOutput, Recipe, merge_with_recipe, task_vectors
from .lora import LoraTaskResult, byom_lora, factored_svd
from .registry import get_method, list_methods
from .select import kth_largest_magnitude, top
from .sparse import SparseEntries, SparseTaskResult, byom_fft, post_pruning
from .streaming import merge_files, task_arithmetic_files, ties_files

__all__ = [
    "EMRResult",
    "LoraTaskResult",
    "MergeOutput",
    "Recipe",
    "SparseEntries",
    "SparseTaskResult",
    "byom_fft",
    "byom_lora",
    "dare",
    "emr",
    "factored_svd",
    "get_method",
    "kth_largest_magnitude",
    "list_methods",
    "merge_files",
    "merge_with_recipe",
    "post_pruning",
    "simple_average",
    "task_arithmetic",
    "task_arithmetic_files",
    "task_vectors",
    "textbook",
    "ties",
    "ties_files",
    "top",
]
