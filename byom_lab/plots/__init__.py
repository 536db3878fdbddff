"""Figures for the notebooks: pure functions returning a matplotlib Figure, one module per subject.

`common` holds the theme and labels, `tasks` the task pictures, `results` the accuracy figures; the
others hold each lesson's mechanism figures: `anatomy` (00), `task_vectors` (01), `signs` (02),
`residuals` (03), `spectra` (04), `pairs` (05), `storage` (06), `adaptation` (07), `files` (08).
"""
from .adaptation import accuracy_bytes_data, lambda_heatmap, mask_count_bars, per_task_bars, training_curves
from .anatomy import accuracy_by_task, captioned_vs_codeword, drift_by_layer, task_confusions
from .common import METHOD_LABELS, figure, method_label, percent
from .files import bytes_per_task, where_bytes_go
from .pairs import pair_byom_curves, pair_feature_shift, pair_lambda_curves, pair_vectors
from .residuals import distance_and_progress, energy_share, kept_by_layer, residual_sizes
from .results import (accuracy_vs_m, accuracy_vs_num_tasks, accuracy_vs_params, accuracy_vs_rank, error_vs_rank,
                      lambda_curve, pair_comparison, plot_byom_panel)
from .signs import (accuracy_sweep, agreement_histogram, conflicts_by_layer, dare_error, energy_curve, lambda_curves,
                    switch_ladder)
from .spectra import lora_accuracy_and_storage, lora_error_decay, singular_value_spectra, svd_speed
from .storage import interference_growth, pareto, relative_vs_num_tasks, short_label, storage_vs_tasks
from .task_vectors import interference_heatmap, lambda_per_task, norms_and_sum
from .tasks import similarity_heatmap, task_gallery, task_vector_similarity

__all__ = [
    "METHOD_LABELS", "accuracy_by_task", "accuracy_bytes_data", "accuracy_sweep", "accuracy_vs_m",
    "accuracy_vs_num_tasks", "accuracy_vs_params", "accuracy_vs_rank", "agreement_histogram", "bytes_per_task",
    "captioned_vs_codeword", "conflicts_by_layer", "dare_error", "distance_and_progress", "drift_by_layer",
    "energy_curve", "energy_share", "error_vs_rank", "figure", "interference_growth", "interference_heatmap",
    "kept_by_layer", "lambda_curve", "lambda_curves", "lambda_heatmap", "lambda_per_task", "lora_accuracy_and_storage",
    "lora_error_decay", "mask_count_bars", "method_label", "norms_and_sum", "pair_byom_curves", "pair_comparison",
    "pair_feature_shift", "pair_lambda_curves", "pair_vectors", "pareto", "per_task_bars", "percent",
    "plot_byom_panel", "relative_vs_num_tasks", "residual_sizes", "short_label", "similarity_heatmap",
    "singular_value_spectra", "storage_vs_tasks", "svd_speed", "switch_ladder", "task_confusions", "task_gallery",
    "task_vector_similarity", "training_curves", "where_bytes_go",
]
