"""The Colab quickstart notebook runs top to bottom on CPU (with a small step count)."""

import os

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
    assert "project at" in outputs and "'" in outputs  # installed, trained, sampled (repr of the texts)


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
    notebook = nbformat.read(FINETUNE, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(FINETUNE)}})
    client.execute()
    lines = [line for cell in notebook.cells for out in cell.get("outputs", [])
             for line in out.get("text", "").splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, lines
    summary = json.loads(lines[0][len("SUMMARY "):])
    assert summary["steps"] == 30 and summary["eval_loss_end"] < summary["eval_loss_start"] - 0.1, summary
    assert {os.path.basename(p) for p in summary["peft_files"]} >= {"adapter_config.json",
                                                                     "adapter_model.safetensors"}
    assert all(os.path.getsize(p) > 0 for p in summary["peft_files"]) and os.path.isfile(summary["lora_config"])
    assert summary["peft_max_abs_logit_diff"] < 1e-3
