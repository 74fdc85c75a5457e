"""The Colab quickstart notebook runs top to bottom on CPU (with a small step count)."""

import ast
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e .[test])")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e .[test])")

NOTEBOOK = str(pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb")


def execute(path: str):
    """Run every cell of the notebook at `path` (from its own folder, as Colab would) and return it with outputs."""
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    return notebook


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
    monkeypatch.setenv("QUICKSTART_STEPS", "6")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("XLA_FLAGS", "")
    notebook = execute(NOTEBOOK)
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


FINETUNE = os.path.join(os.path.dirname(NOTEBOOK), "finetune.ipynb")


@pytest.mark.slow
def test_finetune_notebook_lowers_the_loss_and_writes_the_adapters(monkeypatch):
    """convert (a tiny random HF model), LoRA SFT on the Alpaca records, chat, PEFT export: the loss fell, the
    adapter files exist, and the PEFT model on the HF base gives our merged model's logits."""
    import json

    from conftest import shared_file

    monkeypatch.setenv("ALPACA_PATH", str(shared_file("alpaca-cleaned-first1000.json")))
    monkeypatch.setenv("FINETUNE_STEPS", "30")
    monkeypatch.setenv("FINETUNE_RECORDS", "240")
    monkeypatch.setenv("XLA_FLAGS", "")
    notebook = execute(FINETUNE)
    lines = [line for cell in notebook.cells for out in cell.get("outputs", [])
             for line in out.get("text", "").splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, lines
    summary = json.loads(lines[0][len("SUMMARY "):])
    assert summary["steps"] == 30 and summary["eval_loss_end"] < summary["eval_loss_start"] - 0.1, summary
    assert {os.path.basename(p) for p in summary["peft_files"]} >= {"adapter_config.json",
                                                                     "adapter_model.safetensors"}
    assert all(os.path.getsize(p) > 0 for p in summary["peft_files"]) and os.path.isfile(summary["lora_config"])
    assert summary["peft_max_abs_logit_diff"] < 1e-3
