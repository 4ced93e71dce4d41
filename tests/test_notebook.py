"""notebooks/schedulers.ipynb: stored executed (its figures visible on the repository's page, small enough to
review), and it executes again top to bottom with the check figures in its outputs.

Store it again after editing it: ``python tests/test_notebook.py`` executes it and writes it back.

The notebook runs in a Jupyter kernel started with *this* interpreter (``sys.executable``), through a
kernel spec written into a temporary folder: a ``python3`` kernel spec elsewhere on the machine (in
``~/.local/share/jupyter``, say, pointing at another Python without fastface_pl) can never be picked
up, and a fresh ``python3 -m venv .venv`` works without activating it or registering a kernel.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "schedulers.ipynb"
CELL_TIMEOUT_S = 300
MAX_SAVED_SIZE_BYTES = 250_000  # the executed notebook with its 7 figures (64-colour PNGs)


def read_notebook() -> nbformat.NotebookNode:
    assert NOTEBOOK.is_file(), f"missing {NOTEBOOK}"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    return notebook


def this_python_kernel_manager(folder: Path) -> AsyncKernelManager:
    """A kernel manager whose only ``python3`` kernel spec runs ``sys.executable -m ipykernel_launcher``."""
    spec_dir = folder / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (this interpreter)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def output_texts(notebook: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed as text, joined."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif "data" in output and "text/plain" in output.data:
                parts.append(output.data["text/plain"])
    return "\n".join(parts)


def execute_notebook(folder: Path) -> nbformat.NotebookNode:
    """The notebook executed in a kernel of this interpreter, from an empty working folder inside ``folder``
    (its figures and toy run go to tempfile folders there). Raises CellExecutionError, naming the cell."""
    workdir = folder / "cwd"  # not notebooks/: the notebook must not rely on files beside it
    workdir.mkdir()
    notebook = read_notebook()
    client = NotebookClient(
        notebook,
        km=this_python_kernel_manager(folder),
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(cleanup_kc=True)  # the kernel is shut down either way
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # timings: noise in a diff
    return notebook


def check_outputs(notebook: nbformat.NotebookNode) -> None:
    """The executed notebook shows the check figures of docs/scheduler.md and its 7 figures, and no error."""
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.output_type == "error"]
    assert not errors
    text = output_texts(notebook)
    # docs/scheduler.md's check figure: FastFace defaults, T = 202,320 -> first decision on step 94,269.
    assert "FastFace: first decision at optimizer step 94269" in text
    assert "the defaults λ = 5e-5, τ = 0.05 give step 94269" in text
    # The Moving Haar replay reproduces the logged LR changes (11 of 12 on the exact log row).
    assert "12 decisions, 12 logged LR changes; 11 of 12 on the exact log row" in text
    # The λ × τ grid: a 5 × 5 table whose default cell is the check figure and where small λ with
    # large τ never decides.
    grid_rows = re.findall(r"^\s*(\d\S*)((?:\s+(?:\d+|none)){5})\s*$", text, flags=re.MULTILINE)
    assert len(grid_rows) == 5, text
    assert "none" in text and "94269" in dict(grid_rows)["5e-05"].split()
    # The callback demo made at least one decision in a real Trainer.
    assert re.search(r"decisions \(optimizer step, factor, new LR\): \[\(\d+, 0\.5, ", text)
    images = sum("image/png" in output.get("data", {})
                 for cell in notebook.cells for output in cell.get("outputs", []))
    assert images >= 7, f"expected the 7 figures of the notebook, got {images}"


def test_notebook_is_stored_executed_and_small():
    notebook = read_notebook()
    assert notebook.metadata.kernelspec.name == "python3"
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code_cells) >= 8, "the notebook lost its code cells"
    assert sum(cell.cell_type == "markdown" for cell in notebook.cells) >= len(code_cells) // 2, \
        "the notebook should explain its code cells"
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1)), \
        "store it executed top to bottom: python tests/test_notebook.py"
    check_outputs(notebook)
    assert NOTEBOOK.stat().st_size < MAX_SAVED_SIZE_BYTES
    source = "\n".join(cell.source for cell in code_cells)
    assert "load_loss_log()" in source, "the notebook must read the curve that ships with the package"
    stored = source + output_texts(notebook)
    assert "shared/" not in stored and not re.search(r"['\"]?/(work|home|tmp)/", stored), \
        "the notebook must not depend on, or show, paths of the machine it ran on"


@pytest.mark.slow
def test_notebook_executes_and_shows_check_figures(tmp_path, monkeypatch):
    # Kernel files (IPython profile, connection files) go to the temporary folder, not to $HOME.
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # The notebook's figures and toy run go to tempfile folders: keep them inside pytest's tmp_path.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    started = time.perf_counter()
    check_outputs(execute_notebook(tmp_path))
    elapsed = time.perf_counter() - started
    print(f"notebook executed in {elapsed:.1f} s")


def shrink_figures(notebook: nbformat.NotebookNode, colours: int = 64) -> None:
    """Store each figure as a PNG of ``colours`` colours (a third of the bytes; line plots lose nothing visible)."""
    import base64
    import io

    from PIL import Image

    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                image = Image.open(io.BytesIO(base64.b64decode(output.data["image/png"]))).convert("RGB")
                buffer = io.BytesIO()
                image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG",
                                                                                      optimize=True)
                output.data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")


if __name__ == "__main__":  # store the notebook executed
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.environ.update(IPYTHONDIR=f"{folder}/ipython", JUPYTER_RUNTIME_DIR=f"{folder}/runtime",
                          PYDEVD_DISABLE_FILE_VALIDATION="1", TMPDIR=folder)
        executed = execute_notebook(Path(folder))
    check_outputs(executed)
    shrink_figures(executed)
    partial = NOTEBOOK.with_name(f".{NOTEBOOK.name}.partial")
    nbformat.write(executed, partial)
    os.replace(partial, NOTEBOOK)
    print(f"{NOTEBOOK}: {NOTEBOOK.stat().st_size} bytes")
