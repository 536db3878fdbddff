"""Notebook hygiene: drop execution counts, unchecked outputs and volatile metadata (`byom-lab clean-notebooks`)."""
import json
from pathlib import Path

VOLATILE_CELL_KEYS = ("execution", "collapsed", "scrolled", "ExecuteTime")


def clean(nb: dict) -> dict:
    """A copy of a notebook (as JSON dict) without execution counts or volatile metadata."""
    nb = json.loads(json.dumps(nb))
    nb["metadata"] = {k: v for k, v in nb.get("metadata", {}).items() if k == "kernelspec"}
    for cell in nb.get("cells", []):
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k not in VOLATILE_CELL_KEYS}
        cell.pop("id", None)
        if cell["cell_type"] == "code":
            # nbval compares only cells marked NBVAL_CHECK_OUTPUT and refuses stored outputs on
            # cells without an execution count: checked cells keep theirs (count fixed at 1),
            # every other cell is stored without outputs.
            checked = "NBVAL_CHECK_OUTPUT" in "".join(cell.get("source", ""))
            count = 1 if checked else None
            cell["execution_count"] = count
            if not checked:
                cell["outputs"] = []
            for out in cell.get("outputs", []):
                if "execution_count" in out:
                    out["execution_count"] = count
                out.get("metadata", {}).pop("transient", None)
                data = out.get("data", {})
                data.pop("application/vnd.jupyter.widget-view+json", None)
                if out.get("output_type") in ("display_data", "execute_result") and not data:
                    out["data"] = {"text/plain": ["<widget>"]}
    nb["nbformat_minor"] = min(nb.get("nbformat_minor", 4), 4)
    return nb


def dumps(nb: dict) -> str:
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
