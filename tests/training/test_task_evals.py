"""lm-eval tasks during training (config.eval_tasks): rows in metrics.jsonl and TensorBoard, one-line config errors."""

import json
import math

import jax
import pytest
from helpers.trainers import small_config, tensorboard_scalars

from llama2_jax.evaluation.harness import evaluate_tasks
from llama2_jax.model.config import LlamaConfig
from llama2_jax.text.tokenizer import Tokenizer
from llama2_jax.training import sft_run, task_evals
from llama2_jax.training.checks import ConfigError
from train import pretrain

pytest.importorskip("lm_eval", reason="needs the [eval] extra: pip install -e .[eval]")

PARAGRAPHS = ["The quick brown fox jumps over the lazy dog.", "In Python, a list is written with square brackets.",
              "Paris is the capital of France.", "Water boils at one hundred degrees."]
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def text_file(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text("\n\n".join(PARAGRAPHS) + "\n")
    return path


def task_config(tmp_path, **overrides):
    return small_config(**{"eval_tasks": "text_perplexity", "eval_tasks_every_steps": 4, "eval_tasks_limit": 3,
                           "eval_tasks_metadata": f"text_path={text_file(tmp_path)}", "num_train_steps": 8,
                           "sample_prompts": (), **overrides})


@pytest.mark.slow  # a minute on a busy 2-core machine: a tiny pretrain plus three lm-eval passes
def test_pretraining_with_eval_tasks_logs_eval_task_metric_rows(tmp_path, capsys):
    workdir = tmp_path / "work"
    result = pretrain.train_and_evaluate(task_config(tmp_path, progress_bar=True), str(workdir))
    state, history = result.state, result.history
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    task_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in task_rows] == [4, 8]  # every eval_tasks_every_steps, and the last step
    for row in task_rows:
        # One row per eval: the task's metrics and its document count (lm-eval's sample_len = the limit).
        assert set(row) == {"step", "eval/text_perplexity/sample_len"} | {f"eval/text_perplexity/{m}" for m in METRICS}
        assert row["eval/text_perplexity/sample_len"] == 3
        assert all(math.isfinite(row[f"eval/text_perplexity/{m}"]) for m in METRICS)
    assert task_rows[0] != task_rows[1]  # the params of each step, not the initial ones
    last_bits = task_rows[1]["eval/text_perplexity/bits_per_byte"]
    assert f"text_perplexity/bits_per_byte={last_bits:.4g}" in capsys.readouterr().err  # the bar's last value
    # The step-8 row is exactly what lm-eval gives on the final params evaluated on their own.
    model_cfg = LlamaConfig.from_dict(json.loads((workdir / "llama_config.json").read_text()))
    alone = evaluate_tasks(jax.device_get(state.params), model_cfg, Tokenizer(str(workdir / "tokenizer.model")),
                           ["text_perplexity"], limit=3, num_fewshot=None, dtype="float32",
                           metadata={"text_path": str(text_file(tmp_path))})
    for metric in METRICS:
        assert task_rows[1][f"eval/text_perplexity/{metric}"] == pytest.approx(alone["text_perplexity"][metric],
                                                                               rel=1e-5)
    assert {h["step"]: h for h in history if "eval/text_perplexity/bits_per_byte" in h}.keys() == {4, 8}
    tensorboard = tensorboard_scalars(workdir)
    assert tensorboard[8]["eval/text_perplexity/bits_per_byte"] == pytest.approx(
        task_rows[1]["eval/text_perplexity/bits_per_byte"], rel=1e-6)


def fail_if_compiled(*args, **kwargs):
    raise AssertionError("the state was built before the config error")


@pytest.mark.parametrize("overrides, message", [
    pytest.param({"eval_tasks": "text_perplexity,no_such_task"},
                 r"^config.eval_tasks: unknown lm-eval task\(s\) no_such_task",
                 marks=pytest.mark.slow),  # an unknown name means indexing lm-eval's own task YAMLs (~30 s)
    ({"eval_tasks_metadata": "text_path"}, r"^config.eval_tasks_metadata: 'text_path' is not KEY=VALUE"),
    ({"eval_tasks_metadata": "text_path=/absent/val.txt"}, r"^config.eval_tasks_metadata: text_path=/absent/"),
    ({"eval_tasks_every_steps": 0}, r"^config.eval_tasks_every_steps is 0, expected an integer >= 1"),
    ({"eval_tasks_limit": -1}, r"^config.eval_tasks_limit is -1"),
])
def test_bad_eval_task_fields_fail_before_the_state_is_built(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(sft_run, "init_state", fail_if_compiled)
    with pytest.raises(ConfigError, match=message):
        pretrain.train_and_evaluate(task_config(tmp_path, **overrides), str(tmp_path / "work"))


def test_eval_tasks_without_lm_eval_names_the_extra(tmp_path, monkeypatch):
    real_find_spec = task_evals.importlib.util.find_spec
    monkeypatch.setattr(task_evals.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a))
    monkeypatch.setattr(sft_run, "init_state", fail_if_compiled)
    with pytest.raises(ConfigError, match=r"lm-eval is not installed: pip install -e \.\[eval\]$"):
        pretrain.train_and_evaluate(task_config(tmp_path), str(tmp_path / "work"))


def test_no_eval_tasks_means_no_extra_evals():
    assert task_evals.make_task_evals(small_config(), None, None, None) is None


def test_metadata_pairs_and_metric_names():
    assert task_evals.parse_metadata(" text_path=a.txt , piqa_path=b.jsonl,") == {"text_path": "a.txt",
                                                                                   "piqa_path": "b.jsonl"}
    assert task_evals.flat_keys({"piqa_local": {"acc": 0.5, "acc_norm": 0.25}}) == {
        "eval/piqa_local/acc": 0.5, "eval/piqa_local/acc_norm": 0.25}
