"""train.pretrain end to end on CPU: a tiny run, exact resume, SIGTERM, kill -9, and one-line input errors.

Covers llama2_jax.training.loop."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from helpers.trainers import small_config, train_losses

from llama2_jax.training import loop
from llama2_jax.training.checks import ConfigError
from train import pretrain

REPO = str(pathlib.Path(__file__).resolve().parents[2])


def test_tiny_run_logs_evaluates_checkpoints_and_samples(tmp_path, capsys):
    result = pretrain.train_and_evaluate(small_config(), str(tmp_path))
    state, history = result.state, result.history
    assert int(state.step) == 8
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 9))
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [4, 8] and evals[-1]["eval_perplexity"] > 1
    assert {"learning_rate", "tokens_per_sec", "grad_norm"} <= history[0].keys()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
    assert (tmp_path / "tokenizer.model").is_file() and (tmp_path / "llama_config.json").is_file()
    assert os.listdir(tmp_path / "tensorboard")
    out = capsys.readouterr().out
    assert "unigram entropy" in out and "--- sample ---" in out


def test_resume_gives_bitwise_identical_losses(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain.train_and_evaluate(small_config(), str(straight))

    real_to_global, calls = loop.process_rows_to_global, []

    def crash_at_step_6(batch, mesh):  # a crash after the step-4 checkpoint, mid-way to the next one
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated crash")
        return real_to_global(batch, mesh)

    monkeypatch.setattr(loop, "process_rows_to_global", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.train_and_evaluate(small_config(async_checkpoints=False), str(resumed))
    monkeypatch.setattr(loop, "process_rows_to_global", real_to_global)
    pretrain.train_and_evaluate(small_config(), str(resumed))  # resumes model, optimizer and data iterator
    a, b = train_losses(straight), train_losses(resumed)
    assert [a[s] for s in range(5, 9)] == [b[s] for s in range(5, 9)]  # exact float equality
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # step 5, logged before the crash, once
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]


def run_cli(workdir, *overrides, wait=True):
    args = [sys.executable, "-m", "train.pretrain", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--config.model.vocab_size=512", "--config.tokenizer.train_vocab_size=512", "--config.model.dim=64",
            "--config.model.n_layers=2", "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
            "--config.seq_len=32", "--config.batch_size=8", "--config.progress_bar=False",
            "--config.log_every_steps=1", *overrides]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    if wait:
        return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(train_losses(workdir), default=0) >= step:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {timeout}s")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = run_cli(tmp_path, "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
                   "--config.eval_every_steps=100000", wait=False)
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()  # EX_TEMPFAIL: saved, not finished
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert saved and max(saved) >= 3


@pytest.mark.slow
def test_resume_after_kill_9_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common_args = ("--config.num_train_steps=12", "--config.checkpoint_every_steps=4", "--config.eval_every_steps=100")
    result = run_cli(straight, *common_args)
    assert result.returncode == 0, result.stderr
    proc = run_cli(killed, *common_args, "--config.async_checkpoints=False", wait=False)
    wait_for_step(killed, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_cli(killed, *common_args)  # resumes from the last complete checkpoint (step 4)
    assert result.returncode == 0, result.stderr
    a, b = train_losses(straight), train_losses(killed)
    assert [a[s] for s in range(5, 13)] == [b[s] for s in range(5, 13)]


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make_overrides,message", [
    (lambda d: {"data.source": "text", "data.path": str(d / "missing.txt")}, "missing.txt"),
    (lambda d: {"data.source": "text", "data.path": write(d / "empty.txt", "")}, "empty.txt"),
    (lambda d: {"data.source": "jsonl", "data.path": write(d / "bad.jsonl", '{"text": "ok"}\nnot json\n')},
     "bad.jsonl:2"),
    (lambda d: {"model.vocab_size": 640}, "640"),
    (lambda d: {"batch_size": 12}, "batch_size"),
    (lambda d: {"mesh.data": 16, "mesh.fsdp": 1}, "16"),
    (lambda d: {"seq_len": 64}, "max_seq_len"),
    (lambda d: {"model.n_kv_heads": 3}, "n_kv_heads"),
])
def test_bad_input_is_one_clear_line_before_compilation(tmp_path, make_overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        pretrain.train_and_evaluate(small_config(**make_overrides(tmp_path)), str(tmp_path / "work"))
    assert "\n" not in str(error.value)


def test_cli_error_is_printed_as_one_line(tmp_path):
    result = run_cli(tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=1")  # the subprocess has 1 CPU device
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: config.mesh") and "Traceback" not in result.stderr


def test_unknown_config_field_is_one_line(tmp_path):
    result = run_cli(tmp_path, "--config.learning_rat=1e-3")  # a typo of a real field
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: --config.learning_rat: configs/tiny.py has no field 'learning_rat' "
                                     '(Did you mean "learning_rate" instead of "learning_rat"?)')
    assert not (tmp_path / "work").exists()
