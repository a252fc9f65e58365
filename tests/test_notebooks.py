"""Every notebook runs top to bottom on FAST settings, in order, sharing one output folder (03 serves 02's run)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
KERNEL = "medcap-tests"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A Jupyter kernel that runs this very interpreter (the venv's), registered in a temporary JUPYTER_PATH."""
    pytest.importorskip("ipykernel", reason="pip install ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "medcap tests", "language": "python"}
    (root / "kernels" / KERNEL).mkdir(parents=True)
    (root / "kernels" / KERNEL / "kernel.json").write_text(json.dumps(spec))
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), previous]))
    yield KERNEL
    if previous is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = previous


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """One output folder for all notebooks of this run."""
    return tmp_path_factory.mktemp("notebooks")


def test_notebooks_are_committed_without_outputs():
    assert [p.name for p in PATHS] == ["01_data_exploration.ipynb", "02_train_and_compare.ipynb",
                                       "03_serving_client.ipynb"]
    for path in PATHS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert "MEDCAP_NOTEBOOK_FAST" in code[0].source  # the parameter cell comes first


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path: Path, out: Path, kernel: str, monkeypatch):
    monkeypatch.setenv("MEDCAP_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MEDCAP_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("MEDCAP_CACHE_DIR", str(out / "cache"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel draws inline
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel, timeout=300, startup_timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
