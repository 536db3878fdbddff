"""The notebook series as a course: run it (outputs stored), write code-along copies, render a static site."""
import html
import json
import os
import re
import time
from pathlib import Path

from . import nbclean
from .cache import atomic_path

STUDENT_STUB = "# Your solution here. The next cell checks it.\n"


def series(folder="notebooks") -> list:
    """The numbered lesson notebooks of `folder`, in order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no notebook folder at {folder}")
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return paths


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def title(nb: dict) -> str:
    """The first markdown heading of a notebook (its title), without the leading #."""
    for cell in nb.get("cells", []):
        if cell["cell_type"] == "markdown":
            for line in nbclean.source(cell).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


def execute(path, timeout: int = 1200, kernel: str = "python3") -> float:
    """Run a notebook top to bottom in a fresh kernel and store its outputs (cleaned) in place; seconds taken.

    The notebook runs with its own folder as working directory. The file is replaced only when
    every cell succeeded, so a failure leaves the committed notebook as it was.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    start = time.time()
    backend = os.environ.pop("MPLBACKEND", None)  # with Agg the kernel shows no figures, so none would be stored
    try:
        NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    seconds = time.time() - start
    with atomic_path(path) as tmp:
        tmp.write_text(nbclean.dumps(nbclean.clean(json.loads(nbformat.writes(nb)))))
    return seconds


def student_copy(nb: dict) -> dict:
    """A code-along copy: no outputs, each worked solution replaced by an empty cell to fill in."""
    nb = nbclean.clean(nb)
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        if nbclean.is_solution(cell):
            cell["source"] = STUDENT_STUB
            cell["metadata"] = {k: v for k, v in cell["metadata"].items() if k != "jupyter"}
        cell["outputs"], cell["execution_count"] = [], None
    return nb


def write_student_copies(out, folder="notebooks") -> list:
    """Write the code-along copy of every lesson into `out` (created); returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in series(folder):
        target = out / path.name
        with atomic_path(target) as tmp:
            tmp.write_text(nbclean.dumps(student_copy(_read(path))))
        written.append(target)
    return written


def _objectives(nb: dict) -> list:
    """The bullet points under the lesson's objectives heading (for the index page)."""
    for cell in nb.get("cells", []):
        text = nbclean.source(cell)
        if cell["cell_type"] == "markdown" and re.search(r"(?im)^#+\s*.*(objectives|you will be able)", text):
            return [line.lstrip("-* ").strip() for line in text.splitlines() if line.lstrip().startswith(("- ", "* "))]
    return []


def render_site(out, folder="notebooks") -> Path:
    """Render every executed lesson to static HTML in `out`, with an index page; returns the index's path."""
    from nbconvert import HTMLExporter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    rows = []
    for path in series(folder):
        nb = _read(path)
        body, _ = exporter.from_filename(str(path))
        page = out / f"{path.stem}.html"
        with atomic_path(page) as tmp:
            tmp.write_text(body)
        items = "".join(f"<li>{html.escape(o)}</li>" for o in _objectives(nb))
        rows.append(f'<li><a href="{page.name}">{html.escape(title(nb) or path.stem)}</a>'
                    + (f"<ul>{items}</ul>" if items else "") + "</li>")
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text("<!doctype html><html><head><meta charset='utf-8'><title>byom-lab lessons</title></head><body>"
                       "<h1>byom-lab: data-free model merging, lesson by lesson</h1><ol>" + "".join(rows)
                       + "</ol></body></html>\n")
    return index
