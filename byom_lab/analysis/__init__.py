"""Measurements behind the lessons' "why" figures: pure functions over state dicts and suites, one module per subject.

`oracle` compares a textbook implementation with the fast one (agreement and speed-up); the others
serve one lesson each: `anatomy` (00), `task_vectors` (01), `signs` and `sparsify` (02),
`residuals` (03), `spectra` (04), `pairs` (05), `storage` (06), `data_methods` (07), `files` (08).
"""
from . import anatomy, data_methods, files, pairs, residuals, signs, sparsify, spectra, storage, task_vectors
from .oracle import compare, show_source

__all__ = ["anatomy", "compare", "data_methods", "files", "pairs", "residuals", "show_source", "signs", "sparsify",
           "spectra", "storage", "task_vectors"]
