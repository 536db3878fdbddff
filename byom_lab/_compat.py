"""Make torchvision (and so open_clip) importable beside a CPU-only torch.

PyPI's torchvision wheel is built against CUDA; next to the CPU torch wheel its `_C`
extension cannot load, and its meta registrations then fail with
``operator torchvision::nms does not exist``. Defining the two op schemas those
registrations refer to lets torchvision, timm and open_clip import; only torchvision's
own C++ ops stay unavailable (byom-lab uses none of them). When the extension loads
(matching torch and torchvision) this module does nothing.
"""
import importlib.util
import os

import torch

_applied = False


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    folder = spec.submodule_search_locations[0]
    libs = [f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not libs:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, libs[0]))
    except (OSError, RuntimeError):
        return False
    return True


def fix_torchvision() -> bool:
    """Define torchvision's nms/qnms schemas if its extension cannot load; True if applied."""
    global _applied
    if _applied or _extension_loads():
        return _applied
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        try:
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined by someone else
            pass
    fix_torchvision._lib = lib  # keep the fragment alive
    _applied = True
    return True
