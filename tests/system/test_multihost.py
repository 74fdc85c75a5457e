"""Multi-host on JAX's own runtime: 2 processes x 4 CPU devices (gloo collectives) train exactly like 1 x 8.

Covers llama2_jax.training.hosts."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = str(pathlib.Path(__file__).resolve().parents[2])
ARGS = ["--config=configs/tiny.py", "--config.model.vocab_size=512", "--config.tokenizer.train_vocab_size=512",
        "--config.model.dim=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
        "--config.model.n_kv_heads=2", "--config.seq_len=32", "--config.batch_size=8", "--config.progress_bar=False",
        "--config.log_every_steps=1", "--config.num_train_steps=4", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, devices, *extra):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "train.pretrain", *ARGS, f"--workdir={workdir}", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    address = f"localhost:{free_port()}"
    two = [launch(tmp_path / "two", 4, f"--coordinator_address={address}", "--num_processes=2",
                  f"--process_id={i}") for i in range(2)]
    one = launch(tmp_path / "one", 8)
    for proc in two + [one]:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    single, multi = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in single] == [r["step"] for r in multi]
    for a, b in zip(single, multi):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"step {a['step']} {key}")
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]
