"""notebooks/quickstart.ipynb runs top to bottom, and its results say what its text says they do.

The notebook runs in a fresh kernel of this interpreter, in a temporary working directory, with its
``WORKDIR`` parameter pointed at a directory that does not exist: so it takes the path that trains the
tiny config (into a temporary directory of its own) and writes nothing into the repository.
"""

import ast
import os
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient (pip install -e '.[test]')")
nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (pip install -e '.[test]')")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
TIMEOUT = 300  # seconds per cell; the whole notebook takes about a minute on 2 CPU cores


def _tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _result(cell):
    """The value a cell ends with (its execute_result), as a Python literal."""
    results = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert results, f"cell has no result; its outputs: {cell.outputs}"
    return ast.literal_eval(results[-1].data["text/plain"])


def test_the_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                "clear the notebook's outputs before committing it: "
                "jupyter nbconvert --clear-output --inplace notebooks/quickstart.ipynb")


def test_the_notebook_runs_and_shows_what_it_claims(tmp_path, monkeypatch):
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    _tagged(nb, "parameters").source = f"WORKDIR = {str(tmp_path / 'no_such_run')!r}"

    # A python3 kernel of this interpreter (not whatever "python3" the user's Jupyter paths hold).
    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "python3")
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    # The kernel inherits the environment (conftest's CPU devices and compilation cache); the repository is
    # importable whatever the working directory.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    client = nbclient.NotebookClient(nb, km=km, timeout=TIMEOUT, resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    assert list(cwd.iterdir()) == [], "the notebook wrote into its working directory"

    # Section 2: at 10 model calls DPM-Solver++ (2M) is closer to the data than DDIM, and DDIM than DDPM.
    quality = _result(_tagged(nb, "quality"))
    assert set(quality) == {"ddim", "ddpm", "dpmpp_2m"}, quality
    assert quality["dpmpp_2m"][10] < quality["ddim"][10] < quality["ddpm"][10], quality
    for name, q in quality.items():  # and every sampler improves from 5 to 20 calls
        assert q[20] < q[5], (name, q)

    # Section 3: guidance at scale 3 puts more samples in the requested class's component than no
    # guidance (scale 1), which puts far more there than the unconditional model (scale 0, about 1/3).
    share = _result(_tagged(nb, "guidance"))
    assert share[3.0] > share[1.0] > share[0.0] + 0.3, share

    # Section 4 drew its grid.
    grid = _tagged(nb, "digits")
    assert any("image/png" in o.get("data", {}) for o in grid.outputs), grid.outputs

    # Section 5: the converted tiny SD folder reads prompts with CLIP's BPE as transformers does, encodes them as
    # transformers' text encoder does, and draws one 16x16 RGB image per prompt, which the last cell shows.
    sd = _result(_tagged(nb, "text_to_image"))
    assert sd["tokens"][0] == ["a", "watercolor", "painting", "of", "a", "fox"], sd
    assert sd["same_ids_as_transformers"] and sd["context_max_abs_diff"] < 1e-4, sd
    assert sd["images"] == (2, 16, 16, 3), sd
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert any("image/png" in o.get("data", {}) for o in last.outputs), last.outputs
