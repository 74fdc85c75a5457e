"""A trainer program's `__main__` (python -m train.<trainer>): --config, --workdir and the multi-host flags, the
distributed start-up, and every ConfigError / CheckpointError / WriterError / FileNotFoundError as one line and exit
status 1; a run stopped by SIGTERM exits with status 75 (EX_TEMPFAIL, "try again": the rerun resumes) right after its
checkpoint is saved, so that `&&` chains and the recipe do not take a stopped run for a finished one."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from absl import flags
from absl import logging as absl_logging

from llama2_jax.cli import common as cli_common
from llama2_jax.model import sharding as sh
from llama2_jax.training import workdir_lock
from llama2_jax.checkpoints.layout import CheckpointError
from llama2_jax.training.checks import ConfigError, check_workdir_path, config_load_error
from llama2_jax.training.loop import STOPPED_EXIT_STATUS, Terminated
from llama2_jax.training.tracking import WriterError

FLAGS = flags.FLAGS


def define_runtime_flags() -> None:
    """Flags every trainer takes besides --config: the workdir and multi-host start-up."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard and the tokenizer.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
    flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "Index of this process, 0 .. num_processes-1 (multi-host).")
    flags.mark_flags_as_required(["workdir"])


def run_main(train_and_evaluate: Callable[[Any, str], Any]) -> Callable[[list[str]], None]:
    """An absl `main` that starts the distributed runtime, runs the trainer, and turns ConfigError into one line."""
    def main(argv):
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
        if len(argv) > 1:
            raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            try:
                config = FLAGS.config
                if hasattr(config, "keys"):
                    config.keys()  # a config file that failed to load raises OSError on first use
            except OSError as error:
                raise ConfigError(config_load_error(error)) from None
            check_workdir_path(FLAGS.workdir)
            sh.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            train_and_evaluate(config, FLAGS.workdir)
        except Terminated as stopped:  # saved: exit now, without the final evaluation and samples
            print(stopped, file=sys.stderr)
            sys.exit(STOPPED_EXIT_STATUS)
        except (ConfigError, CheckpointError, WriterError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        finally:
            workdir_lock.release_all()

    return main


def run_trainer(train_and_evaluate: Callable[[Any, str], Any], config_help: str) -> None:
    """A trainer's `__main__`: --config, the runtime flags, then `run_main`. Flags are defined here, when run, not at
    import, so tests can import several trainers together."""
    from absl import app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    define_runtime_flags()
    logging.getLogger("absl").setLevel(logging.WARNING)
    app.run(run_main(train_and_evaluate), flags_parser=cli_common.parse_config_flags)
