import json
from pathlib import Path

import pytest

from byom_lab import nbclean

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_are_numbered():
    assert NOTEBOOKS, "no notebooks found"
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(len(numbers)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    text = path.read_text()
    assert nbclean.dumps(nbclean.clean(json.loads(text))) == text, f"run `byom-lab clean-notebooks` on {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_and_defines_nothing(path):
    """Notebooks import byom_lab first and hold no library code (no def / class)."""
    nb = json.loads(path.read_text())
    code = [("".join(c["source"]) if isinstance(c["source"], list) else c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert code[0].startswith("import byom_lab as bl")
    for src in code:
        for line in src.splitlines():
            assert not line.lstrip().startswith(("def ", "class ")), f"{path.name}: library code in a notebook: {line}"


def test_clean_removes_volatile_fields():
    nb = {"metadata": {"kernelspec": {"name": "python3"}, "language_info": {"version": "3.11"}},
          "cells": [{"cell_type": "code", "execution_count": 7, "metadata": {"execution": {"t": 1}}, "source": "1",
                     "outputs": [{"output_type": "execute_result", "execution_count": 7, "data": {"text/plain": "1"}, "metadata": {}}]}],
          "nbformat": 4, "nbformat_minor": 5}
    checked = json.loads(json.dumps(nb["cells"][0]))
    checked["source"] = "# NBVAL_CHECK_OUTPUT\n1"
    nb["cells"].append(checked)
    out = nbclean.clean(nb)
    assert out["metadata"] == {"kernelspec": {"name": "python3"}}
    plain, kept = out["cells"]
    assert plain["execution_count"] is None and plain["outputs"] == [] and plain["metadata"] == {}
    assert kept["execution_count"] == 1 and kept["outputs"][0]["execution_count"] == 1
    assert kept["outputs"][0]["data"] == {"text/plain": "1"}
    assert nb["cells"][0]["execution_count"] == 7  # input untouched
