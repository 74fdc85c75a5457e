"""The Colab quickstart notebook runs top to bottom on CPU (with a small step count)."""

import ast
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e .[test])")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e .[test])")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
    monkeypatch.setenv("QUICKSTART_STEPS", "6")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("XLA_FLAGS", "")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    outputs = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    lines = outputs.splitlines()
    assert f"project at {os.path.dirname(os.path.dirname(NOTEBOOK))}" in lines  # the checkout: nothing installed
    losses = re.search(r"^train loss ([\d.]+) at step 1 -> ([\d.]+) at step 6$", outputs, re.M)
    assert losses and float(losses[2]) < float(losses[1]), outputs  # six steps of training lowered the loss
    plot = next(line.removeprefix("plot written to ") for line in lines if line.startswith("plot written to "))
    assert os.path.getsize(plot) > 1000  # a PNG of the loss curve
    samples = [ast.literal_eval(line.removeprefix("sample: ")) for line in lines if line.startswith("sample: ")]
    assert len(samples) == 2 and samples[0].startswith("The") and samples[1].startswith("In Python,"), samples
    assert len(samples[0]) > len("The") and len(samples[1]) > len("In Python,")  # text generated after the prompts
