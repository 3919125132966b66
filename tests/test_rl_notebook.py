"""notebooks/04_async_rl.ipynb runs top to bottom (small settings: two 6-step runs of a random tiny model)."""

from pathlib import Path

import pytest


@pytest.mark.slow
def test_async_rl_notebook_executes():
    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parent.parent
    nb = nbformat.read(root / "notebooks" / "04_async_rl.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "sync :" in outputs and "async:" in outputs
