"""SIGTERM: the run saves a checkpoint and stops right after it, without the final evaluation, report or samples (a
scheduler's grace period is short), and the trainer command line says so in one line and exits with status 75
(EX_TEMPFAIL: saved, not finished; the same command resumes).

Covers llama2_jax.cli.trainer."""

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from configs import tiny
from llama2_jax.training import loop
from train import pretrain

REPO = pathlib.Path(__file__).resolve().parents[2]


def small_config():
    config = tiny.get_config()
    config.model.update(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32)
    config.tokenizer.train_vocab_size = 512
    config.update(seq_len=32, batch_size=8, num_train_steps=8, warmup_steps=2, log_every_steps=1, eval_every_steps=3,
                  eval_batches=2, checkpoint_every_steps=100, progress_bar=False, sample_prompts=("The",),
                  sample_tokens=4)
    return config


def test_sigterm_saves_then_stops_without_evaluation_report_or_samples(tmp_path, monkeypatch, capsys):
    real_to_global, calls = loop.process_rows_to_global, []

    def sigterm_during_step_3(batch, mesh):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_to_global(batch, mesh)

    evaluations = []
    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a: evaluations.append(1) or real_evaluate(*a))
    monkeypatch.setattr(loop, "process_rows_to_global", sigterm_during_step_3)
    with pytest.raises(loop.Terminated) as stopped:
        pretrain.train_and_evaluate(small_config(), str(tmp_path))
    assert str(stopped.value) == (f"stopped by SIGTERM after step 3, saved in {tmp_path / 'checkpoints'}/3: run the "
                                  "same command to resume")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    assert evaluations == []  # step 3 was due an evaluation: skipped, the checkpoint comes first
    out = capsys.readouterr().out
    assert "--- sample ---" not in out and "unigram entropy" not in out  # pretrain's report did not run


def test_the_trainer_command_line_prints_the_line_and_exits_75(tmp_path):
    script = (
        "from ml_collections import config_flags\n"
        "from llama2_jax.cli import trainer\n"
        "from llama2_jax.training import loop\n"
        "config_flags.DEFINE_config_file('config', None, 'config')\n"
        "trainer.define_runtime_flags()\n"
        "trainer.FLAGS(['x', '--config=configs/tiny.py', '--workdir=%s'])\n"
        "def stopped(config, workdir):\n"
        "    raise loop.Terminated('stopped by SIGTERM after step 3, saved in W/checkpoints/3: run the same command')\n"
        "trainer.run_main(stopped)(['x'])\n" % tmp_path)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 75, result.stderr
    assert result.stderr == "stopped by SIGTERM after step 3, saved in W/checkpoints/3: run the same command\n"
