"""The lesson notebooks: stored and clean, shaped as lessons, and the course commands (student copies, HTML site)."""
import json
import re
from pathlib import Path

import pytest

from byom_lab import cli, lessons, nbclean

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
MAX_NOTEBOOK_BYTES, MAX_SERIES_BYTES = 600_000, 4_000_000


def _nb(path):
    return json.loads(path.read_text())


def _code(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebooks_exist_and_are_numbered():
    assert NOTEBOOKS, "no notebooks found"
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(len(numbers)))
    assert [p.name for p in lessons.series(FOLDER)] == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    text = path.read_text()
    assert nbclean.dumps(nbclean.clean(json.loads(text))) == text, f"run `byom-lab clean-notebooks` on {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_and_defines_nothing(path):
    """Notebooks import byom_lab first and hold no library code (no def / class outside worked solutions)."""
    code = _code(_nb(path))
    assert nbclean.source(code[0]).startswith("import byom_lab as bl")
    for cell in code:
        if nbclean.is_solution(cell):
            continue  # a student's answer may define a small function
        for line in nbclean.source(cell).splitlines():
            assert not line.lstrip().startswith(("def ", "class ")), f"{path.name}: library code in a notebook: {line}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_in_order(path):
    """Every code cell ran, top to bottom, in one kernel: counts 1, 2, 3, … and figures stored as PNG."""
    code = _code(_nb(path))
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), f"re-run {path.name} top to bottom"
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    assert pngs >= 3, f"{path.name} stores {pngs} figures"
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size} bytes"


def test_the_series_fits_its_size_budget():
    assert sum(p.stat().st_size for p in NOTEBOOKS) <= MAX_SERIES_BYTES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_the_anatomy_of_a_lesson(path):
    """Objectives up front, prose with equations, predictions before results, 4-6 checked exercises, a close."""
    nb = _nb(path)
    md = "\n".join(nbclean.source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert re.search(r"(?im)^#+.*objectives", md), "no learning objectives"
    assert re.search(r"(?im)prerequisite", md) and re.search(r"(?im)(run time|takes about|minutes? to run)", md)
    words = len(re.findall(r"[A-Za-z][A-Za-z'-]+", md))
    assert 1200 <= words <= 3200, f"{path.name}: {words} words of prose"
    assert md.count("$") >= 20, "too few equations"
    assert len(re.findall(r"(?im)^#+\s*predict|\*\*predict", md)) >= 2, "no predict-then-run cells"
    assert re.search(r"(?im)^#+.*(summary|what we (saw|learned)|recap)", md) and re.search(r"(?im)^#+.*references", md)
    cells = nb["cells"]
    heads = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
             and re.search(r"(?im)^#+\s*exercise\s+\d", nbclean.source(c))]  # "### Exercise 3 · ..."
    assert 4 <= len(heads) <= 6, f"{path.name}: {len(heads)} exercises"
    for i in heads:  # each exercise: a hidden worked solution, then a visible cell that asserts the answer
        following = cells[i + 1:i + 4]
        solution = next((c for c in following if nbclean.is_solution(c)), None)
        assert solution is not None, f"exercise at cell {i} has no hidden solution cell"
        checks = [c for c in following if c["cell_type"] == "code" and "assert" in nbclean.source(c)]
        assert checks, f"exercise at cell {i} has no assert"


def test_student_copies_drop_outputs_and_solutions(tmp_path):
    assert cli.main(["notebooks", "--folder", str(FOLDER), "--student", str(tmp_path / "student")]) == 0
    copies = sorted((tmp_path / "student").glob("*.ipynb"))
    assert [p.name for p in copies] == [p.name for p in NOTEBOOKS]
    for original, copy in zip(NOTEBOOKS, copies):
        nb, orig = _nb(copy), _nb(original)
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in _code(nb))
        solutions = [nbclean.source(c) for c in _code(orig) if nbclean.is_solution(c)]
        text = copy.read_text()
        assert all(s.strip() not in text for s in solutions if s.strip())
        assert sum(nbclean.source(c) == lessons.STUDENT_STUB for c in _code(nb)) == len(solutions)
        assert len(nb["cells"]) == len(orig["cells"])  # the prose and the checks stay


def test_html_site_has_an_index_linking_every_lesson(tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    for path in NOTEBOOKS[:2]:
        (folder / path.name).write_text(path.read_text())
    assert cli.main(["notebooks", "--folder", str(folder), "--html", str(tmp_path / "site")]) == 0
    index = (tmp_path / "site" / "index.html").read_text()
    for path in NOTEBOOKS[:2]:
        page = tmp_path / "site" / f"{path.stem}.html"
        assert f'href="{page.name}"' in index
        assert "<img" in page.read_text() and lessons.title(_nb(path)) in page.read_text()


def test_notebooks_command_needs_an_action_and_a_series(tmp_path, capsys):
    assert cli.main(["notebooks"]) == 2
    assert "--execute" in capsys.readouterr().err
    assert cli.main(["notebooks", "--folder", str(tmp_path), "--student", str(tmp_path / "out")]) == 2
    assert "no numbered notebooks" in capsys.readouterr().err


def test_clean_keeps_outputs_orders_counts_and_drops_volatile_fields():
    nb = {"metadata": {"kernelspec": {"name": "python3"}, "language_info": {"version": "3.11"}, "widgets": {}},
          "cells": [{"cell_type": "code", "execution_count": 7, "metadata": {"execution": {"t": 1}}, "source": "1",
                     "outputs": [{"output_type": "execute_result", "execution_count": 7, "data": {"text/plain": "1"}, "metadata": {}},
                                 {"output_type": "stream", "name": "stderr", "text": "100%|███| 3/3 [00:01<00:00]"}]},
                    {"cell_type": "code", "execution_count": 9, "metadata": {"jupyter": {"source_hidden": True}},
                     "source": "x = 2", "outputs": [{"output_type": "display_data", "metadata": {},
                                                     "data": {nbclean.WIDGET_VIEW: {"model_id": "ab"},
                                                              "text/plain": "pruning:   0%|   | 0/3"}}]},
                    {"cell_type": "code", "execution_count": None, "metadata": {}, "source": "y", "outputs": []}],
          "nbformat": 4, "nbformat_minor": 5}
    out = nbclean.clean(nb)
    assert out["metadata"] == {"kernelspec": {"name": "python3"}}
    first, hidden, never = out["cells"]
    assert first["execution_count"] == 1 and first["metadata"] == {}
    assert first["outputs"] == [{"output_type": "execute_result", "execution_count": 1, "data": {"text/plain": "1"}, "metadata": {}}]
    assert hidden["execution_count"] == 2 and hidden["outputs"] == [] and nbclean.is_solution(hidden)
    assert never["execution_count"] is None
    assert nb["cells"][0]["execution_count"] == 7  # input untouched
