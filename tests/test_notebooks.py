"""The teaching notebooks never rot: each one runs top to bottom in the fast setting, and the committed
notebooks are exactly what notebooks/build_notebooks.py writes, executed, without machine paths.

Execution goes through build_notebooks.execute, as `make notebooks` does: nbclient, a kernel of this
very Python, MICROLM_FAST=1 and one torch thread; a notebook then takes seconds. Like `make notebooks`,
the runs write their scratch files under runs/notebooks/fast/ (git ignores runs/).
"""

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
MACHINE_PATHS = ("/work/", "/home/", "/tmp/", "/Users/", "/root/", "C:\\")
EXPECTED = ["01_tokenizer", "02_model", "03_pretraining", "04_lora", "05_finetune_merge_compare"]


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOK_DIR / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


def committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def visible_texts(nb: nbformat.NotebookNode):
    """Every text a reader sees in the outputs. Images are skipped: base64 can spell anything."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                yield out["text"]
            for mime, data in out.get("data", {}).items():
                if not mime.startswith("image/"):
                    yield data if isinstance(data, str) else json.dumps(data)
            if "traceback" in out:
                yield "\n".join(out["traceback"])


def machine_paths_in(nb: nbformat.NotebookNode) -> list[str]:
    return [text[max(0, text.find(p) - 40): text.find(p) + 60]
            for text in visible_texts(nb) for p in MACHINE_PATHS if p in text]


def test_the_five_notebooks_are_built_and_committed():
    assert list(builder.NOTEBOOKS) == EXPECTED
    missing = [n for n in EXPECTED if not (NOTEBOOK_DIR / f"{n}.ipynb").is_file()]
    assert not missing, f"{missing}: run `make notebooks` (or MICROLM_FAST=1 make notebooks)"


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_holds_exactly_the_generated_cells(name):
    built, saved = builder.build(name), committed(name)
    assert [(c.cell_type, c.source) for c in saved.cells] == [(c.cell_type, c.source) for c in built.cells], (
        f"{name}.ipynb differs from build_notebooks.py: edit the script, then run `make notebooks`")


@pytest.mark.parametrize("name", EXPECTED)
def test_prose_carries_the_teaching_at_least_as_many_markdown_as_code_cells(name):
    kinds = [c.cell_type for c in builder.build(name).cells]
    assert kinds.count("markdown") >= kinds.count("code"), kinds


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_was_executed_top_to_bottom_without_errors(name):
    code_cells = [c for c in committed(name).cells if c.cell_type == "code"]
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1)), (
        f"{name}.ipynb is not fully executed in order: run `make notebooks`")
    assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_outputs_hold_no_machine_paths(name):
    assert not machine_paths_in(committed(name))


def test_notebooks_run_in_a_kernel_of_this_python():
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.environ.get('MICROLM_FAST'))"))
    builder.execute(nb, fast=True, timeout=120)
    assert nb.cells[0].outputs[0]["text"].split() == [sys.executable, "1"]


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_top_to_bottom_in_the_fast_setting(name):
    nb = builder.execute(builder.build(name), fast=True, timeout=600)  # raises on the first failing cell
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    assert not machine_paths_in(nb)
