"""Nothing lost under faults: kills between PPO's two saves, two runs on one workdir, cut checkpoints, a full disk,
duplicated metrics rows after a resume (the crash-and-resume test in test_pretrain.py checks one row per step), file
permissions, and no spurious Orbax warnings on load.

Covers llama2_jax.checkpoints.storage, llama2_jax.training.checkpointer and llama2_jax.training.workdir_lock."""

import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.checkpoints import CFG, init_np
from helpers.tmpfs import mounted_tmpfs
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama2_jax.checkpoints import params_io as ckpt
from llama2_jax.checkpoints import storage
from llama2_jax.checkpoints.layout import LOCK_FILE, UNREADABLE_DIR, CheckpointError
from llama2_jax.cli import convert
from llama2_jax.training import loop, tracking, workdir_lock
from llama2_jax.training.checkpointer import TrainCheckpointer
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.rlhf_setup import Rewards
from llama2_jax.training.run_dir import lock_workdir
from llama2_jax.training.state import LoopState, TrainState
from train import ppo, pretrain

REPO = str(pathlib.Path(__file__).resolve().parents[2])


# ------------------------------------------------------------------------------------------------------ helpers


def tiny_state(value: float, step: int, size: int = 16):
    """(TrainState of one [size] float32 param and SGD-with-momentum state, replicated shardings)."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    tx = optax.sgd(0.1, momentum=0.9)
    params = {"w": jnp.full((size,), value, jnp.float32)}
    state = TrainState.create(params, tx).replace(step=jnp.asarray(step, jnp.int32))
    return state, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), state)


def random_state(step: int, size: int):
    """A state whose param does not compress (random floats): `size` * 4 bytes on disk."""
    state, shardings = tiny_state(0.0, step, size)
    noise = np.random.default_rng(step).standard_normal(size).astype(np.float32)
    return state.replace(params={"w": jnp.asarray(noise)}), shardings


def cut_short(item_dir) -> str:
    """Truncate the largest file under an Orbax item dir to half its size (a kill or a full disk mid-write)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(item_dir) for f in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    return largest


def one_line(text: str) -> bool:
    return "\n" not in str(text).strip() and "Traceback" not in str(text)


def w_of(state) -> float:
    return float(np.asarray(state.params["w"])[0])


# ---------------------------------------------------------------------- 1. PPO: policy and value model as one step


def ppo_checkpointer(workdir):
    return (TrainCheckpointer(str(workdir), max_to_keep=3, async_save=False, models=("value",)),
            ppo.PromptBatches([[1]], [None], 1, 4, seed=0))


def ppo_state(iteration, policy_value, value_value, step):
    """The LoopState PPO's loop steps: the policy (main) and the value model after `iteration` iterations."""
    (policy, shardings), (value, value_shardings) = tiny_state(policy_value, step), tiny_state(value_value, step)
    return (LoopState(iteration, policy, {"value": value}),
            LoopState(None, shardings, {"value": value_shardings}))


def test_ppo_resumes_from_the_newest_step_that_holds_both_models(tmp_path, caplog):
    """The two models are saved as one Orbax step: a step that lost one model's files (a kill while it was written
    is impossible: Orbax renames a finished step into place) does not read and is set aside."""
    checkpointer, prompts = ppo_checkpointer(tmp_path)
    for iteration in (1, 2):
        prompts.order.position = iteration
        checkpointer.save(ppo_state(iteration, float(iteration), 10.0 + iteration, 4 * iteration)[0],
                          prompts.get_state(), force=True)
    checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "8").iterdir() if p.is_dir()) == [
        "extra", "opt_state", "params", "value_opt_state", "value_params"]
    shutil.rmtree(tmp_path / "checkpoints" / "8" / "value_params")  # step 8 without its value model

    checkpointer, prompts = ppo_checkpointer(tmp_path)
    template, shardings = ppo_state(0, 0.0, 0.0, 0)
    with caplog.at_level(logging.WARNING):
        state, data = checkpointer.restore(template, shardings)
    prompts.set_state(data)
    iteration, policy, value = int(state.step), state.main, state.others["value"]
    assert iteration == 1 and int(policy.step) == 4 and prompts.order.position == 1
    assert (w_of(policy), w_of(value)) == (1.0, 11.0)
    assert "checkpoints/8 cannot be read" in caplog.text
    assert (tmp_path / UNREADABLE_DIR / "8").is_dir() and not (tmp_path / "checkpoints" / "8").exists()
    # iteration 2 is redone and saved again at policy step 8; a third run resumes from it
    checkpointer.save(ppo_state(2, 2.5, 12.5, 8)[0], prompts.get_state(), force=True)
    checkpointer.close()
    checkpointer, prompts = ppo_checkpointer(tmp_path)
    state, _ = checkpointer.restore(template, shardings)
    checkpointer.close()
    assert int(state.step) == 2 and (w_of(state.main), w_of(state.others["value"])) == (2.5, 12.5)


# --------------------------------------------- 2. SIGTERM in a round: the nested fine-tuning run, then the rounds


def rounds_loop(workdir, steps, step_fn):
    settings = loop.LoopSettings(num_train_steps=steps, log_every_steps=1, checkpoint_every_steps=1,
                                 async_checkpoints=False, progress_bar=False)
    return loop.run_loop(settings=settings, workdir=str(workdir), mesh=None, state=LoopState(0),
                         shardings=LoopState(None), train_step=step_fn, train_iter=None)


def test_sigterm_during_a_round_stops_its_fine_tuning_and_the_round_is_redone(tmp_path):
    """A round (rejection sampling: sample, then a nested fine-tuning loop) that gets SIGTERM before its nested loop
    starts: the nested loop saves without running a step and reports it, the round is not counted, and a rerun
    redoes it (the nested loop resuming)."""
    nested_steps = []

    def one_round(state, batch, signal_first):
        index = int(jax.device_get(state.step))
        if signal_first:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the round samples
        inner = rounds_loop(tmp_path / f"round_{index}", 3, lambda s, b: (s.replace(step=int(s.step) + 1),
                                                                          {"loss": 0.0}))
        nested_steps.append(len(inner.history))
        if inner.interrupted:
            raise loop.Interrupted
        return state.replace(step=index + 1), {"round": float(index)}

    first = rounds_loop(tmp_path / "rounds", 2, lambda s, b: one_round(s, b, signal_first=True))
    assert first.interrupted and first.history == [] and nested_steps == [0]
    assert not (tmp_path / "rounds" / "checkpoints").exists() or not os.listdir(tmp_path / "rounds" / "checkpoints")
    again = rounds_loop(tmp_path / "rounds", 2, lambda s, b: one_round(s, b, signal_first=False))
    assert not again.interrupted and [h["step"] for h in again.history] == [1, 2] and nested_steps == [0, 3, 3]
    assert sorted(os.listdir(tmp_path / "rounds" / "checkpoints")) == ["1", "2"]


# ------------------------------------------------------------------------------------- 3. one run per workdir


def live_lock(workdir, pid):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_FILE), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": pid}, f)


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_on_a_locked_workdir_refuses_naming_the_holder(tmp_path, other_process):
    from helpers.trainers import small_config

    live_lock(tmp_path, other_process.pid)
    with pytest.raises(ConfigError, match=f"in use by process {other_process.pid} on host "
                                                 f"{socket.gethostname()}") as error:
        pretrain.train_and_evaluate(small_config(), str(tmp_path))
    assert one_line(error.value)
    assert not (tmp_path / "llama_config.json").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live_lock(tmp_path, dead.pid)
    with caplog.at_level(logging.WARNING):
        lock_workdir(str(tmp_path))
    try:
        assert f"taking over the lock of process {dead.pid}" in caplog.text
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder == {"host": socket.gethostname(), "pid": os.getpid()}
        lock_workdir(str(tmp_path))  # this process already holds it: a second in-process run goes on
    finally:
        workdir_lock.release(str(tmp_path))
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.slow  # ~20 s: builds a PPO and an RS run up to the lock
def test_rl_trainers_take_the_lock_too(tmp_path, other_process):
    """PPO and rejection sampling go through the same lock (checked before any model is loaded)."""
    from helpers.ppo_run import tiny_config
    from helpers.rlhf_models import make_tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    config = tiny_config(tmp_path, tokenizer)
    live_lock(tmp_path / "ppo", other_process.pid)
    with pytest.raises(ConfigError, match=f"in use by process {other_process.pid}"):
        ppo.train(config, str(tmp_path / "ppo"), Rewards({"helpful": None}, {}))
    from train import rejection_sampling
    rs_config = rejection_sampling_config(config)
    live_lock(tmp_path / "rs", other_process.pid)
    with pytest.raises(ConfigError, match=f"in use by process {other_process.pid}"):
        rejection_sampling.train(rs_config, str(tmp_path / "rs"), Rewards({"helpful": None}, {}))


def rejection_sampling_config(ppo_config):
    from configs import rs_tiny
    config = rs_tiny.get_config()
    config.init_from, config.prompts.path = ppo_config.init_from, ppo_config.prompts.path
    config.prompts.max_prompt_len, config.sampling.max_gen_len = 24, 16
    return config


def test_the_cli_releases_the_lock_at_exit_also_on_errors(tmp_path):
    script = (
        "import sys\n"
        "from absl import app, flags\n"
        "from llama2_jax.cli import trainer as common\n"
        "from llama2_jax.training import run_dir\n"
        "from llama2_jax.training.checks import ConfigError\n"
        "flags.DEFINE_string('config', None, '')\n"
        "common.define_runtime_flags()\n"
        "def run(config, workdir):\n"
        "    run_dir.lock_workdir(workdir)\n"
        "    raise ConfigError('config.x: bad after the lock')\n"
        "app.run(common.run_main(run))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", script, f"--workdir={tmp_path}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == "error: config.x: bad after the lock"
    assert not (tmp_path / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------- 6. a checkpoint cut short


def test_resume_falls_back_to_the_newest_intact_step(tmp_path, caplog):
    checkpointer = TrainCheckpointer(str(tmp_path), async_save=False)
    for step in (4, 8):
        checkpointer.save(random_state(step, 4096)[0], {"position": step})
    checkpointer.close()
    cut_short(tmp_path / "checkpoints" / "8" / "params")

    checkpointer = TrainCheckpointer(str(tmp_path), async_save=False)
    template, shardings = tiny_state(0.0, 0, 4096)
    with caplog.at_level(logging.WARNING):
        state, data = checkpointer.restore(template, shardings)
    assert int(state.step) == 4 and data == {"position": 4}
    np.testing.assert_array_equal(state.params["w"], random_state(4, 4096)[0].params["w"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "cannot be read" in
                r.getMessage()]
    assert len(warnings) == 1 and one_line(warnings[0]) and "checkpoints/8" in warnings[0]
    assert checkpointer.all_steps() == [4] and (tmp_path / UNREADABLE_DIR / "8").is_dir()
    checkpointer.save(random_state(8, 4096)[0], {"position": 8})  # step 8 is redone and saved again
    checkpointer.close()


def test_resume_with_no_readable_step_is_one_line_and_moves_nothing(tmp_path):
    checkpointer = TrainCheckpointer(str(tmp_path), async_save=False)
    checkpointer.save(random_state(4, 4096)[0], {})
    checkpointer.close()
    cut_short(tmp_path / "checkpoints" / "4" / "params")
    checkpointer = TrainCheckpointer(str(tmp_path), async_save=False)
    with pytest.raises(CheckpointError, match=r"checkpoints/4 cannot be read") as error:
        checkpointer.restore(*tiny_state(0.0, 0, 4096))
    checkpointer.close()
    assert one_line(error.value) and (tmp_path / "checkpoints" / "4").is_dir()


def write_workdir(path, steps):
    """A trainer workdir of the model CFG (params only) at `steps`, each step's params init_np(CFG, seed=step)."""
    checkpointer = TrainCheckpointer(str(path), async_save=False)
    for step in steps:
        state = TrainState.create(init_np(CFG, seed=step), optax.sgd(0.1, momentum=0.9)).replace(step=jnp.asarray(step))
        checkpointer.save(state, {})
    checkpointer.close()
    (path / "llama_config.json").write_text(json.dumps(CFG.to_dict()))


def test_load_params_skips_a_cut_step_and_refuses_a_cut_converted_dir(tmp_path, caplog):
    write_workdir(tmp_path / "work", (1, 2))
    cut_short(tmp_path / "work" / "checkpoints" / "2" / "params")
    with caplog.at_level(logging.WARNING):
        params, _ = ckpt.load_params(tmp_path / "work")  # init_from, generate and convert read through this
    np.testing.assert_array_equal(params["output"], init_np(CFG, seed=1)["output"])
    assert "checkpoints/2/params cannot be read" in caplog.text and "loading the older" in caplog.text

    ckpt.save_params(tmp_path / "converted", init_np(CFG), CFG)
    cut_short(tmp_path / "converted" / "params")
    with pytest.raises(ValueError, match=r"converted/params cannot be read") as error:
        ckpt.load_params(tmp_path / "converted")
    assert one_line(error.value)


def test_generate_cli_on_a_cut_checkpoint_prints_one_error_line(tmp_path, llama_tokenizer_path):
    cfg = CFG.replace(vocab_size=32000)  # the tokenizer's vocabulary: the CLI checks it before reading weights
    ckpt.save_params(tmp_path / "converted", init_np(cfg), cfg)
    cut_short(tmp_path / "converted" / "params")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-m", "llama2_jax.generate", f"--checkpoint={tmp_path / 'converted'}",
                             f"--tokenizer={llama_tokenizer_path}", "--prompt=Hi"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "cannot be read" in result.stderr


# --------------------------------------------------------------------------------------------- 7. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only): writes past it fail with ENOSPC."""
    with mounted_tmpfs(tmp_path / "disk", "size=2m") as mount_point:
        yield mount_point


def test_a_full_disk_stops_at_the_next_save_with_one_line(small_disk, capfd):
    checkpointer = TrainCheckpointer(str(small_disk / "work"), async_save=True)
    checkpointer.save(random_state(1, 300_000)[0], {})  # 1.2 MB of random params (zero momentum compresses): fits
    checkpointer.save(random_state(2, 300_000)[0], {})  # does not fit: fails in the background
    with pytest.raises(CheckpointError) as error:
        checkpointer.save(random_state(3, 300_000)[0], {})
    assert one_line(error.value)
    assert str(error.value).startswith("no space left on the device of ") and "step 2" in str(error.value)
    assert str(error.value).endswith("last good checkpoint: step 1")
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) < 5, err[:2000]
    checkpointer.manager.close()


def test_a_failed_last_save_is_reported_at_close(small_disk):
    checkpointer = TrainCheckpointer(str(small_disk / "work"), async_save=True)
    checkpointer.save(random_state(1, 600_000)[0], {})  # 2.4 MB: never fits
    with pytest.raises(CheckpointError, match=r"^no space left .* no good checkpoint yet$"):
        checkpointer.close()


@pytest.fixture
def read_only_checkpoints(tmp_path):
    """WORKDIR/checkpoints on a read-only tmpfs (root only): every save fails with EROFS."""
    with mounted_tmpfs(tmp_path / "work" / "checkpoints", "size=1m,ro") as directory:
        yield directory


@pytest.mark.parametrize("async_save", [False, True])
def test_any_io_error_of_a_save_is_one_line_naming_the_file(read_only_checkpoints, capfd, caplog, async_save):
    """Not only a full disk: a synchronous save on a read-only disk raised Orbax's OSError (a traceback at the command
    line) and an asynchronous one logged ~200 lines of Orbax's background-thread tracebacks before the one line."""
    checkpointer = TrainCheckpointer(str(read_only_checkpoints.parent), async_save=async_save)
    with pytest.raises(CheckpointError) as error:
        checkpointer.save(random_state(1, 100)[0], {})
        checkpointer.wait()
    assert str(error.value) == (f"saving checkpoint step 1 in {read_only_checkpoints} failed ([Errno 30] Read-only "
                                f"file system: '{read_only_checkpoints}/1.orbax-checkpoint-tmp'); no good checkpoint "
                                "yet")
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) < 3, err[:2000]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # Orbax's thread tracebacks
    checkpointer.manager.close()


def test_convert_on_a_full_disk_leaves_nothing_and_the_retry_succeeds(tmp_path, monkeypatch):
    ckpt.save_params(tmp_path / "src", init_np(CFG), CFG)
    real_save = ckpt.save_params

    def disk_full(path, params, config, **kwargs):
        os.makedirs(os.path.join(path, "params.orbax-checkpoint-tmp"))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_params", disk_full)
    assert convert.main(["--from=jax", "--to=jax", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'dst'}"]) == 1
    assert not (tmp_path / "dst").exists()
    monkeypatch.setattr(ckpt, "save_params", real_save)
    assert convert.main(["--from=jax", "--to=jax", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'dst'}"]) == 0


def test_convert_on_a_real_full_disk_is_one_line(tmp_path, small_disk, capsys):
    big = CFG.replace(dim=256, n_heads=4, n_kv_heads=2, multiple_of=64)  # ~4 MB of float32: past the 2 MiB disk
    ckpt.save_params(tmp_path / "src", init_np(big), big)
    dst = small_disk / "dst"
    assert convert.main(["--from=jax", "--to=hf", f"--src={tmp_path / 'src'}", f"--dst={dst}"]) == 1
    err = capsys.readouterr().err  # tqdm's progress line, then the error
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"error: [Errno 28] no space left on the device of {dst} (the partial output was " \
                          "removed; free space and retry)"
    assert not dst.exists()


def test_is_disk_full_recognises_tensorstore_text():
    assert storage.is_disk_full(ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']"))
    assert storage.is_disk_full(RuntimeError("wrapped").with_traceback(None)) is False
    assert storage.is_disk_full(OSError(errno.ENOSPC, "x"))


# ------------------------------------------------------------------------------------------------ usability


def test_loading_a_checkpoint_prints_no_metadata_warning(tmp_path, caplog, capfd):
    ckpt.save_params(tmp_path / "converted", init_np(CFG), CFG)
    write_workdir(tmp_path / "work", (1,))
    with caplog.at_level(logging.INFO):
        ckpt.load_params(tmp_path / "converted")
        ckpt.load_params(tmp_path / "work")
        ckpt.check_params(tmp_path / "work", CFG)
    assert "Metadata file does not exist" not in caplog.text + capfd.readouterr().err


def test_drop_metrics_after_keeps_earlier_rows_and_drops_a_cut_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n{"step": 3, "lo')
    tracking.drop_metrics_after(str(tmp_path), 1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1}\n'


def test_convert_writes_files_with_normal_permissions(tmp_path):
    ckpt.save_params(tmp_path / "src", init_np(CFG), CFG)
    assert convert.main(["--from=jax", "--to=hf", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'hf'}"]) == 0
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert os.stat(tmp_path / "hf" / name).st_mode & 0o777 == 0o666 & ~mask, name


def test_late_errors_of_a_failed_orbax_read_are_not_printed(monkeypatch):
    """A restore that fails on a cut file leaves the other arrays' read coroutines closed with their errors unretrieved:
    Python printed each as 'Exception ignored in: <coroutine object _read_array_index_and_device_put>' with the whole
    TensorStore spec (six of them, ~380 lines, after one recovery). The failure itself is reported in one line."""
    import inspect

    from orbax.checkpoint._src.serialization import serialization

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    storage.drop_closed_loop_callbacks()
    read = serialization._read_array_index_and_device_put
    coroutine = read(**{name: None for name in inspect.signature(read).parameters})  # created, never run
    late = types.SimpleNamespace(exc_type=Exception, exc_traceback=None, err_msg=None, object=coroutine,
                                 exc_value=Exception("Encountered error while reading array index: (slice(0, 64, 1),)"))
    closed_loop = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                        exc_traceback=None, err_msg=None, object=None)
    unrelated = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("a bug elsewhere"), exc_traceback=None,
                                      err_msg=None, object=None)
    for unraisable in (late, closed_loop, unrelated):
        sys.unraisablehook(unraisable)
    coroutine.close()
    assert reported == [unrelated]


def test_a_tensorstore_error_is_shown_without_its_spec():
    error = ValueError("Encountered error while reading array index: (slice(0, 64, 1),). See full TensorStore details: "
                       "<bound method spec of TensorStore({\n  'base': {\n  },\n})>.")
    assert storage.first_line(error) == "Encountered error while reading array index: (slice(0, 64, 1),)."
