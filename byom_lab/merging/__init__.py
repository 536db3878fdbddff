"""byom_lab.merging: data-free model merging as pure functions over state dicts.

Every method takes `dict[str, Tensor]` state dicts (θ0 and one θ_t per task) and returns a merged
state dict or a result object holding the shared model and per-task extras. Methods are
registered by name: `list_methods()`, `get_method(name)` (the test-time methods of
`byom_lab.adaptation` register when it is imported; `byom_lab.list_methods()` lists them all). Results save to BYOM directories
(`result.save(dir)`, `load_result(dir)`); `*_files` functions merge checkpoint files streamed.
"""
from . import textbook
from .emr import EMRResult, emr
from .fisher import fisher
from .family import dare, simple_average, task_arithmetic, ties
from .files import byom_fft_files, family_files, post_pruning_files
from .general import MergeOutput, Recipe, merge_with_recipe, task_vectors
from .lora import LoraTaskResult, byom_lora, factored_svd
from .registry import get_method, list_methods
from .regmean import regmean
from .select import kth_largest_magnitude, top
from .sparse import SparseEntries, SparseTaskResult, byom_fft, post_pruning
from .statistics import ModelStatistics
from .storage import load_result, save_result
from .streaming import merge_files, task_arithmetic_files, ties_files
from .tall import TallMaskResult, consensus, tall_masks

__all__ = [
    "EMRResult",
    "LoraTaskResult",
    "MergeOutput",
    "ModelStatistics",
    "Recipe",
    "SparseEntries",
    "SparseTaskResult",
    "TallMaskResult",
    "byom_fft",
    "byom_fft_files",
    "byom_lora",
    "consensus",
    "dare",
    "emr",
    "factored_svd",
    "family_files",
    "fisher",
    "get_method",
    "kth_largest_magnitude",
    "list_methods",
    "load_result",
    "merge_files",
    "merge_with_recipe",
    "post_pruning",
    "post_pruning_files",
    "regmean",
    "save_result",
    "simple_average",
    "tall_masks",
    "task_arithmetic",
    "task_arithmetic_files",
    "task_vectors",
    "textbook",
    "ties",
    "ties_files",
    "top",
]
