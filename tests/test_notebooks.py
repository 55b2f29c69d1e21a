"""Every notebook runs top to bottom in its quick setting, draws at least one plot, and its
``.ipynb`` holds the same cells as its jupytext ``.py`` (the file that is reviewed and diffed)."""

import time
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_the_five_notebooks_are_there():
    assert [path.stem for path in NOTEBOOKS] == [
        "01_masks_and_attention", "02_loss_and_schedules", "03_train_and_translate", "04_research_by_subclassing",
        "05_language_model",
    ]


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_paired_with_its_script(script):
    paired = script.with_suffix(".ipynb")
    assert paired.is_file(), f"{paired.name} is missing; run `jupytext --sync {script.name}` in notebooks/"
    notebook, source = jupytext.read(paired), jupytext.read(script)
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert [(cell.cell_type, cell.source) for cell in notebook.cells] == \
        [(cell.cell_type, cell.source) for cell in source.cells], f"run `jupytext --sync {script.name}` in notebooks/"


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_and_draws(script, tmp_path, monkeypatch, record_property):
    monkeypatch.setenv("LT_NOTEBOOK_QUICK", "1")  # the notebooks' small setting: seconds, not minutes
    monkeypatch.setenv("LT_RUNS_DIR", str(tmp_path))  # logs and checkpoints stay out of the repository
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = jupytext.read(script)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(script.parent)}}).execute()
    record_property("seconds", round(time.perf_counter() - start, 1))
    plots = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert plots, f"{script.name} drew no plot"


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda path: path.stem)
@pytest.mark.parametrize("where", ["notebooks", "root"])
def test_notebook_writes_inside_the_repository_from_either_folder(script, where, monkeypatch):
    repository = script.parents[1]
    monkeypatch.chdir(script.parent if where == "notebooks" else repository)
    monkeypatch.delenv("LT_RUNS_DIR", raising=False)
    setup = next(cell.source for cell in jupytext.read(script).cells if "RUNS = " in cell.source)
    names: dict = {}
    exec(setup, names)
    assert names["ROOT"].resolve() == repository
    assert names["RUNS"].resolve().is_relative_to(repository)
