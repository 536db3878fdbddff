"""Each data-using method at its default and at its reference code's settings, one option away, and the gap.

    AdaMerging     steps 500 and initial λ 0.3 (EnnengYang/AdaMerging)   vs the defaults (fewer steps, λ from validation)
    Model Tinting  500 epochs = 4,000 steps (AIM-SKKU)                   vs 40 epochs
    RegMean        α = 0.1 (FusionBench's generic default)               vs α = 0.95 (FusionBench's CLIP setting)
    Fisher merging, TALL masks: the defaults are the reference settings (256 images in batches of 32; α = 1, λ_t grid 0.2…0.6).

Runs are cached like every adaptation run, so the table is slow once (the reference runs are long) and a lookup after.
Seconds are the wall time recorded when each run was computed (and its CPU seconds, which a busy machine inflates less).
"""
import pandas as pd

from ..evaluation import evaluate
from .adamerging import REFERENCE as ADAMERGING_REFERENCE
from .adamerging import adamerging, adamerging_plus
from .protocol import regmean_merge
from .tinting import REFERENCE as TINTING_REFERENCE
from .tinting import tinting, tinting_plus


def _average(suite, models, split) -> float:
    return 100 * float(evaluate(suite, models, split)["accuracy"].mean())


def _settings(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def reference_settings_table(suite, split: str = "test") -> pd.DataFrame:
    """One row per data-using method: its default and reference settings, both accuracies, the gap, both costs."""
    rows = []
    runs = [("AdaMerging (task-wise)", adamerging, dict(granularity="task"), ADAMERGING_REFERENCE),
            ("AdaMerging (layer-wise)", adamerging, {}, ADAMERGING_REFERENCE),
            ("AdaMerging++ (layer-wise)", adamerging_plus, {}, ADAMERGING_REFERENCE),
            ("Model Tinting", tinting, {}, TINTING_REFERENCE), ("Tinting++", tinting_plus, {}, TINTING_REFERENCE)]
    for label, fn, options, reference in runs:
        default, ref = fn(suite, **options), fn(suite, **options, **reference)
        shown = {k: default.info["config"][k] for k in reference}
        if "init" in reference:
            shown["init"] = round(default.info["init"], 2)
        rows.append({"method": label, "default": _settings(shown), "reference": _settings(reference),
                     "default_average": _average(suite, default, split), "reference_average": _average(suite, ref, split),
                     "default_seconds": default.info["seconds"], "reference_seconds": ref.info["seconds"],
                     "default_cpu_seconds": default.info["cpu_seconds"], "reference_cpu_seconds": ref.info["cpu_seconds"],
                     "default_steps": default.info["steps"], "reference_steps": ref.info["steps"]})
    (merged, info), (ref, ref_info) = regmean_merge(suite, 0.95), regmean_merge(suite, 0.1)
    rows.append({"method": "RegMean", "default": "alpha=0.95 (FusionBench, CLIP)", "reference": "alpha=0.1 (FusionBench, generic)",
                 "default_average": _average(suite, merged, split), "reference_average": _average(suite, ref, split),
                 "default_seconds": info["seconds"], "reference_seconds": ref_info["seconds"], "default_steps": 0,
                 "reference_steps": 0})  # the Gram statistics are shared; their CPU time is not recorded
    table = pd.DataFrame(rows).set_index("method")
    table.insert(4, "gap", table["reference_average"] - table["default_average"])
    return table
