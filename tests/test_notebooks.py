"""The chapter notebooks: sources in sync, conventions, and every section run after the setup.

The chapters are written as jupytext percent-format sources, ``notebooks/0N_*.py``
(linted by ruff like the rest of the code); the ``.ipynb`` beside each is
generated from it (``jupytext --update --to ipynb notebooks/0*.py``) and committed without
outputs, for Colab and Kaggle. ``test_ipynb_is_generated_from_its_source`` keeps
the two in step.

Cells can be copied: every ``## `` section of a chapter runs after the setup
cells alone (code cells tagged ``setup``). ``test_sections_use_only_setup_names``
checks it statically, and ``test_each_section_runs_after_the_setup_alone``
executes each section in a fresh kernel after the setup cells; together the
sections hold every cell, so this executes the whole notebook. The execution
tests (marker ``notebooks``) run in the default suite; deselect them with
``pytest -m "not notebooks"``.
"""

from __future__ import annotations

import ast
import builtins
import re
import time
from pathlib import Path

import jupytext  # the test extra installs it: the sync check must not be skipped
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
CHAPTERS = [
    "01_inference",
    "02_detection_segmentation",
    "03_finetuning",
    "04_under_the_hood",
]
MAX_CELL_LINES = 20
CELL_TIMEOUT_S = 600
COLAB = "https://colab.research.google.com/github/pali-kit/pali_kit/blob/main/notebooks/{}.ipynb"
KAGGLE = (
    "https://kaggle.com/kernels/welcome?src=https://github.com/pali-kit/pali_kit/blob/main/"
    "notebooks/{}.ipynb"
)
MODEL_LINES = {
    "03_finetuning": 'MODEL = "demo"  # or "paligemma2-3b-pt-224" on a GPU runtime',
}
MODEL_LINE = 'MODEL = "demo"  # or "paligemma2-3b-mix-224" on a GPU runtime'
IPYTHON_NAMES = {"display", "get_ipython"}


def read(chapter: str):
    return jupytext.read(NOTEBOOKS_DIR / f"{chapter}.py")


def code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def is_setup(cell) -> bool:
    return "setup" in cell.metadata.get("tags", [])


def sections(nb) -> tuple[list[str], dict[str, list[str]]]:
    """(setup code cells, {section heading: its other code cells}) in notebook order."""
    setup, found, heading = [], {}, None
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            title = re.match(r"## (.+)", cell.source)
            if title:
                heading = title.group(1).strip()
                found.setdefault(heading, [])
        elif is_setup(cell):
            setup.append(cell.source)
        else:
            assert heading is not None, "a code cell before the first ## heading"
            found[heading].append(cell.source)
    return setup, {h: cells for h, cells in found.items() if cells}


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
          ast.SetComp, ast.DictComp, ast.GeneratorExp)  # fmt: skip


def _parse(source: str) -> ast.Module:
    return ast.parse(re.sub(r"^\s*[%!].*$", "", source, flags=re.M))  # without IPython magics


def _top_level_bound(node) -> set[str]:
    """Names a cell binds in the notebook's namespace (not inside functions or comprehensions)."""
    bound = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(child.name)
        elif isinstance(child, ast.Name) and not isinstance(child.ctx, ast.Load):
            bound.add(child.id)
        elif isinstance(child, ast.alias):
            bound.add((child.asname or child.name).split(".")[0])
        if not isinstance(child, SCOPES):
            bound |= _top_level_bound(child)
    return bound


def names(sources: list[str]) -> tuple[set[str], set[str], set[str]]:
    """(names bound at top level, names bound anywhere, names read) by some cells."""
    top, bound, read_ = set(), set(), set()
    for source in sources:
        tree = _parse(source)
        top |= _top_level_bound(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (read_ if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
    return top, bound | top, read_


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_ipynb_is_generated_from_its_source(chapter):
    source, notebook = read(chapter), jupytext.read(NOTEBOOKS_DIR / f"{chapter}.ipynb")
    cells = lambda nb: [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]
    assert cells(notebook) == cells(source), (
        f"notebooks/{chapter}.ipynb differs from {chapter}.py: run "
        f"`jupytext --update --to ipynb notebooks/{chapter}.py` and commit both"
    )
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs are not committed"


def test_every_chapter_has_a_source_and_a_notebook_and_nothing_else():
    assert sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb")) == CHAPTERS
    assert sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.py")) == CHAPTERS


# ----------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_starts_with_title_badges_and_runtime(chapter):
    first = read(chapter).cells[0].source
    assert first.startswith("# "), "the first cell is the title"
    assert COLAB.format(chapter) in first, "Open in Colab badge"
    assert KAGGLE.format(chapter) in first, "Open in Kaggle badge"
    assert "**Runtime:**" in first


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_has_the_idempotent_setup_cell(chapter):
    nb = read(chapter)
    setup = [c for c in nb.cells if 'find_spec("pali_kit") is None' in c.source]
    assert len(setup) == 1 and is_setup(setup[0]), "one setup cell installs pali_kit when missing"
    cell = setup[0].source
    assert "COLAB_TPU_ADDR" in cell, "refuses Colab's legacy TPU runtime"
    assert "Internet on" in cell, "says that Kaggle needs its internet switch on"
    assert "restart the runtime" in cell, "says when an upgrade needs a restart"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Internet" in text and "restart" in text
    shown = "\n".join(code_cells(nb))
    for call in ("jax.__version__", "jax.default_backend()", "jax.device_count()", "pk.machine()"):
        assert call in shown


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_uses_the_demo_model_and_the_device_dtype(chapter):
    cells = code_cells(read(chapter))
    lines = [ln for c in cells for ln in c.splitlines() if ln.startswith("MODEL =")]
    assert lines == [MODEL_LINES.get(chapter, MODEL_LINE)], "exactly one MODEL line, the demo"
    loads = [ln for c in cells for ln in c.splitlines() if re.search(r"pk\.load\(MODEL", ln)]
    assert all("dtype=pk.device_dtype()" in ln for ln in loads), loads
    assert "pk.device_dtype()" in "\n".join(cells), "weights' dtype chosen by device"
    assert "bfloat16" not in "\n".join(cells), "no hard-coded dtype: pk.device_dtype() decides"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_code_cells_are_short(chapter):
    long = [
        c.splitlines()[0] for c in code_cells(read(chapter)) if len(c.splitlines()) > MAX_CELL_LINES
    ]
    assert not long, f"code cells longer than {MAX_CELL_LINES} lines start with: {long}"


def test_finetuning_sets_the_gpu_memory_fraction_before_jax_loads():
    cells = code_cells(read("03_finetuning"))
    knob = next(i for i, c in enumerate(cells) if "XLA_PYTHON_CLIENT_MEM_FRACTION" in c)
    first_jax = next(i for i, c in enumerate(cells) if re.search(r"^import jax", c, re.M))
    assert knob < first_jax


def test_finetuning_uses_the_memory_lean_loader_and_a_pt_checkpoint():
    text = "\n".join(code_cells(read("03_finetuning")))
    assert "pt.Trainer.load(CHECKPOINT" in text
    assert "pk.load(MODEL" not in text, "a 3B model must not be loaded twice"
    assert "-pt-" in MODEL_LINES["03_finetuning"]


def test_notebooks_never_print_kaggle_keys():
    for chapter in CHAPTERS:
        for cell in code_cells(read(chapter)):
            assert "KAGGLE_KEY" not in cell, f"{chapter}: credentials are read by the kit"


# ----------------------------------------------------------------------------- sections


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_sections_use_only_setup_names(chapter):
    """Each section reads only names that the setup or the section itself defines."""
    setup, found = sections(read(chapter))
    assert setup and found
    setup_bound, _, _ = names(setup)
    known = setup_bound | set(dir(builtins)) | IPYTHON_NAMES
    for heading, cells in found.items():
        top, bound, read_ = names(cells)
        missing = read_ - bound - known
        assert not missing, f"{chapter}, section {heading!r} reads {sorted(missing)} from elsewhere"
        rebound = top & setup_bound
        assert not rebound, f"{chapter}, section {heading!r} rebinds setup names {sorted(rebound)}"


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_each_section_runs_after_the_setup_alone(chapter):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from nbclient.exceptions import CellExecutionError

    setup, found = sections(read(chapter))
    times = {}
    for heading, cells in found.items():
        nb = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(s) for s in setup + cells],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        )
        # kernel "python3" runs this interpreter with this process's environment
        client = nbclient.NotebookClient(
            nb,
            kernel_name="python3",
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
        )
        start = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as error:  # its message holds the cell's source and traceback
            pytest.fail(f"{chapter}, section {heading!r} after the setup:\n{error}", pytrace=False)
        times[heading] = time.perf_counter() - start
    listed = ", ".join(f"{h!r} {s:.0f} s" for h, s in times.items())
    print(f"{chapter}: {len(times)} sections in {sum(times.values()):.0f} s ({listed})")


def test_chapter_1_quotes_the_3b_numbers_as_the_quantization_note_states_them():
    """The 3B figures chapter 1 quotes (decimal numbers of the paragraph naming
    bench/generate.py) are the ones docs/quantization.md gives: a rerun that changes
    the note must change the chapter too."""
    quote = next(c.source for c in read("01_inference").cells
                 if c.cell_type == "markdown" and "bench/generate.py" in c.source)  # fmt: skip
    note = (ROOT / "docs" / "quantization.md").read_text()
    numbers = re.findall(r"\d+\.\d+", quote)
    assert len(numbers) >= 9, numbers  # decode, prefill, peak RSS, in-memory sizes
    missing = [n for n in numbers if not re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", note)]
    assert not missing, f"chapter 1 quotes {missing}, which docs/quantization.md does not give"
