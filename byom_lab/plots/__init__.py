"""Figures for the notebooks: pure functions returning a matplotlib Figure, one module per subject.

`common` holds the theme and labels, `tasks` the task pictures, `results` the accuracy figures.
"""
from .common import METHOD_LABELS, figure, method_label, percent
from .results import (accuracy_vs_m, accuracy_vs_num_tasks, accuracy_vs_params, accuracy_vs_rank, error_vs_rank,
                      lambda_curve, pair_comparison, plot_byom_panel)
from .tasks import similarity_heatmap, task_gallery, task_vector_similarity

__all__ = ["METHOD_LABELS", "accuracy_vs_m", "accuracy_vs_num_tasks", "accuracy_vs_params", "accuracy_vs_rank",
           "error_vs_rank", "figure", "lambda_curve", "method_label", "pair_comparison", "percent", "plot_byom_panel",
           "similarity_heatmap", "task_gallery", "task_vector_similarity"]
