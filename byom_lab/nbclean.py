"""Notebook hygiene: executed outputs kept, execution counts in order, volatile metadata out (`byom-lab clean-notebooks`)."""
import json
from pathlib import Path

VOLATILE_CELL_KEYS = ("execution", "collapsed", "scrolled", "ExecuteTime")
KEPT_NOTEBOOK_KEYS = ("kernelspec",)  # language_info (Python version) and widget state are volatile
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def is_solution(cell: dict) -> bool:
    """A worked solution: a code cell that JupyterLab shows collapsed (its source hidden)."""
    return cell.get("cell_type") == "code" and bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden"))


def source(cell: dict) -> str:
    """A cell's source as one string (notebooks store it as a string or a list of lines)."""
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _clean_output(out: dict, count: int) -> dict | None:
    """An output without volatile parts; None for outputs not worth storing (stderr, widgets)."""
    if out.get("output_type") == "stream" and out.get("name") == "stderr":
        return None  # progress bars and warnings: they differ from run to run
    if "execution_count" in out:
        out["execution_count"] = count
    out.get("metadata", {}).pop("transient", None)
    data = out.get("data", {})
    if WIDGET_VIEW in data or (out.get("output_type") in ("display_data", "execute_result") and not data):
        return None  # a live widget (a panel, a progress bar): its text fallback means nothing on a page
    out.pop("transient", None)
    return out


def clean(nb: dict) -> dict:
    """A copy of a notebook (as JSON dict) with outputs kept, execution counts 1, 2, … in order, no volatile metadata.

    A code cell that was never run (no outputs and no count) keeps no count; nbval compares only
    cells marked `# NBVAL_CHECK_OUTPUT`, so stored outputs elsewhere are for readers.
    """
    nb = json.loads(json.dumps(nb))
    nb["metadata"] = {k: v for k, v in nb.get("metadata", {}).items() if k in KEPT_NOTEBOOK_KEYS}
    count = 0
    for cell in nb.get("cells", []):
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k not in VOLATILE_CELL_KEYS}
        cell.pop("id", None)
        if cell["cell_type"] != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            continue
        ran = cell.get("execution_count") is not None or bool(cell.get("outputs"))
        count += 1
        cell["execution_count"] = count if ran else None
        outputs = [_clean_output(out, count) for out in cell.get("outputs", [])]
        cell["outputs"] = [out for out in outputs if out is not None]
    nb["nbformat_minor"] = min(nb.get("nbformat_minor", 4), 4)
    return nb


def dumps(nb: dict) -> str:
    """The notebook as the JSON text committed to the repository."""
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def clean_file(path) -> bool:
    """Clean one notebook in place; True if it changed."""
    path = Path(path)
    text = path.read_text()
    new = dumps(clean(json.loads(text)))
    if new != text:
        path.write_text(new)
        return True
    return False
