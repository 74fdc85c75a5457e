"""Bad trainer input is one line: the shared trainer fields of every trainer, the trainer command line, a
workdir that is a file or read-only, stray checkpoint directories, a TFDS spec without its extra, config files
that do not load, and a warmup longer than the run.

Covers llama2_jax.training.checks and llama2_jax.training.model_config."""

import importlib
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers.small_inputs import VOCAB, small_tokenizer

from llama2_jax.checkpoints.layout import has_checkpoint
from llama2_jax.training import checks as config_checks
from llama2_jax.training import initial_state
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.model_config import resolve_model_config

REPO = str(pathlib.Path(__file__).resolve().parents[2])
TRAINERS = [("pretrain", "tiny"), ("sft", "sft_tiny"), ("reward", "rm_tiny"), ("dpo", "dpo_tiny"),
            ("rejection_sampling", "rs_tiny"), ("ppo", "ppo_tiny"), ("context_distill", "cd_tiny"), ("gatt", "gatt_tiny")]
BAD_SHARED_FIELDS = [("num_train_steps", 0), ("num_train_steps", -5), ("learning_rate", -1e-4),
                     ("checkpoint_every_steps", 0), ("log_every_steps", 0), ("eval_every_steps", 0),
                     ("warmup_steps", -1), ("batch_size", 0), ("grad_accum_steps", 0), ("eval_batches", -1),
                     ("keep_checkpoints", 0), ("adam_b2", 1.0), ("data.val_fraction", 1.0), ("num_epochs", -1.0)]


def set_field(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value


# ---------------------------------------------------------------------------------------------- shared trainer fields


@pytest.mark.parametrize("trainer,config_name", TRAINERS)
def test_every_trainer_rejects_bad_shared_fields_before_any_work(tmp_path, trainer, config_name):
    module = importlib.import_module(f"train.{trainer}")
    config_module = importlib.import_module(f"configs.{config_name}")
    config_checks.check_shared_fields(config_module.get_config())  # the shipped config passes
    workdir = tmp_path / "work"
    for field, value in BAD_SHARED_FIELDS:
        config = config_module.get_config()
        set_field(config, field, value)
        if field == "num_train_steps":
            config.num_epochs = 0.0  # num_train_steps is the run's length
        with pytest.raises(ConfigError, match=rf"^config\.{field} must be ") as error:
            module.train_and_evaluate(config, str(workdir))
        assert "\n" not in str(error.value) and repr(value) in str(error.value)
    assert not workdir.exists()  # nothing written


def test_every_shipped_config_passes_the_shared_checks():
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        # base.py and recipe_common.py hold shared fields, not a runnable config
        if name.endswith(".py") and name not in ("__init__.py", "base.py", "recipe_common.py"):
            config_checks.check_shared_fields(importlib.import_module(f"configs.{name[:-3]}").get_config())


def test_num_train_steps_is_unchecked_when_epochs_set_the_length():
    from configs import sft_tiny

    config = sft_tiny.get_config()
    config.num_epochs, config.num_train_steps = 1.0, 0
    config_checks.check_shared_fields(config)


def test_cudnn_attention_on_cpu_names_the_field_and_backend():
    from configs import tiny

    config = tiny.get_config()
    config.model.attention_impl = "cudnn"
    with pytest.raises(ConfigError, match=r"^config.model.attention_impl='cudnn' needs an NVIDIA GPU, but the "
                                                 r"JAX backend is 'cpu'"):
        resolve_model_config(config)


def test_workdir_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match=r"^--workdir: .*file is a file, not a directory$"):
        config_checks.check_workdir_path(str(regular))
    config_checks.check_workdir_path(str(tmp_path / "new" / "work"))  # created
    assert (tmp_path / "new" / "work").is_dir()

    def read_only(*args, **kwargs):  # what a read-only directory gives a non-root user (root writes anyway)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    with pytest.raises(ConfigError, match=r"^--workdir: .* is not writable \(Permission denied\)$"):
        config_checks.check_workdir_path(str(tmp_path))


def test_trainer_command_line_one_line_errors(tmp_path):
    """One subprocess, two probes of the real absl entry point: a missing --config file, a --workdir that is a file."""
    regular = tmp_path / "file"
    regular.write_text("x")
    script = (
        "import sys\n"
        "from absl import app\n"
        "from train import pretrain\n"
        "from llama2_jax.cli import trainer as common\n"
        "from ml_collections import config_flags\n"
        "config_flags.DEFINE_config_file('config', None, 'config')\n"
        "common.define_runtime_flags()\n"
        "for argv in (['x', '--config=nope.py', '--workdir=%s'], ['x', '--config=configs/tiny.py', '--workdir=%s']):\n"
        "    common.FLAGS.unparse_flags()\n"
        "    common.FLAGS(argv)\n"
        "    try:\n"
        "        common.run_main(pretrain.train_and_evaluate)(['x'])\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n" % (tmp_path / "w", regular))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert result.stdout.split("\n")[:2] == ["exit 1", "exit 1"], result.stderr
    assert result.stderr.splitlines() == [
        "error: --config: [Errno 2] No such file or directory: 'nope.py'",
        f"error: --workdir: {regular} is a file, not a directory"]


def test_stray_directories_in_checkpoints_are_ignored_with_a_warning(tmp_path, caplog):
    from llama2_jax.training.checkpointer import TrainCheckpointer

    for name in ("backup", "notes.txt", "3.orbax-checkpoint-tmp-17"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="llama2_jax.training.checkpointer"):
        checkpointer = TrainCheckpointer(str(tmp_path), async_save=False)
    assert checkpointer.latest_step() is None and not has_checkpoint(str(tmp_path))
    checkpointer.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'checkpoints'}: ignoring 'backup', 'notes.txt' (not step directories)"]


def test_sft_tfds_spec_without_the_extra_names_it(tmp_path, monkeypatch):
    from configs import sft_tiny
    from train import sft as sft_trainer

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as when the extra is absent
    config = sft_tiny.get_config()
    config.data.path = "tfds:some_dataset"
    config.tokenizer.path = str(small_tokenizer(tmp_path).model_path)
    config.model.vocab_size = VOCAB
    with pytest.raises(ConfigError, match=r"^config.data: .*pip install -e \.\[tfds\]") as error:
        sft_trainer.train_and_evaluate(config, str(tmp_path / "work"))
    assert "\n" not in str(error.value)


def test_config_file_and_recipe_workdir_errors_are_one_line(tmp_path):
    """One subprocess, the trainers' and the recipe's flag parser (cli.common.parse_config_flags) then the recipe's
    main: a missing or misspelt --config file with an override, a config file with a syntax error or that raises, and
    a recipe --workdir that is a file or not writable."""
    regular = tmp_path / "file"
    regular.write_text("x")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("from configs import tiny\n\ndef get_config(:\n    return tiny.get_config()\n")
    raises = tmp_path / "raises.py"
    raises.write_text("def get_config():\n    return undefined_name\n")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    probes = [["--config=configs/nope.py", "--config.num_train_steps=3"],
              ["--config=configs/dpo_tny.py", "--config.seed=1", "--workdir=w"],
              [f"--config={syntax}"], [f"--config={syntax}", "--config.seed=3"], [f"--config={raises}"],
              ["--config=configs/recipe_tiny.py", f"--workdir={regular}"],
              ["--config=configs/recipe_tiny.py", f"--workdir={read_only}"]]
    script = (
        "import sys, tempfile\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "from llama2_jax.cli import common\n"
        "from train import recipe\n"
        "config_flags.DEFINE_config_file('config', None, 'config', lock_config=True)\n"
        "flags.DEFINE_string('workdir', None, 'workdir')\n"
        "def read_only(*args, **kwargs):  # what a read-only directory gives a non-root user (root writes anyway)\n"
        "    raise PermissionError(13, 'Permission denied')\n"
        "for argv in %r:\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    sys.argv = ['x', *argv]  # ml_collections reads the --config.X overrides from sys.argv\n"
        "    tempfile.TemporaryFile = read_only if 'read_only' in ' '.join(argv) else tempfile.TemporaryFile\n"
        "    try:\n"
        "        common.parse_config_flags(sys.argv)\n"
        "        recipe.main(['x'])\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code, flush=True)\n" % probes)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert result.stdout.splitlines() == ["exit 1"] * len(probes), result.stderr
    assert result.stderr.splitlines() == [
        "error: --config: [Errno 2] No such file or directory: 'configs/nope.py'",
        "error: --config: [Errno 2] No such file or directory: 'configs/dpo_tny.py'",
        f"error: --config: {syntax}:3: SyntaxError: invalid syntax",
        f"error: --config: {syntax}:3: SyntaxError: invalid syntax",
        f"error: --config: {raises}:2: NameError: name 'undefined_name' is not defined",
        f"error: --workdir: {regular} is a file, not a directory",
        f"error: --workdir: {read_only} is not writable (Permission denied)"]


def test_a_warmup_longer_than_the_run_is_cut_with_a_warning_naming_both(caplog):
    """--config.warmup_steps=1000 --config.num_train_steps=10 used to cut the warmup to 10 steps without a word. A run
    shorter than its config's warmup is how a shipped config is smoke-tested (configs/tiny.py warms up over 30 steps;
    the tests and the tiny recipe's short runs take 2-12), so it stays allowed, with one warning line."""
    from configs import tiny

    config = tiny.get_config()
    config.warmup_steps = 1000
    with caplog.at_level(logging.WARNING):
        _, schedule = initial_state.make_tx(config, 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["config.warmup_steps (1000) is longer than the run's 10 steps (config.num_train_steps, or the "
                        "steps of config.num_epochs): the learning rate warms up over all 10 steps, reaching its peak "
                        "at the last one, and does not decay"]
    np.testing.assert_allclose([schedule(1), schedule(10)], [config.learning_rate / 10, config.learning_rate],
                               rtol=1e-6)
    caplog.clear()
    config.warmup_steps = 10
    with caplog.at_level(logging.WARNING):
        initial_state.make_tx(config, 10)
    assert not caplog.records
