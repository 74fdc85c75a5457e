"""Metrics writers under faults: a full disk or a failing writer stops the run at once with one line naming the file
and the last good checkpoint (metrics.jsonl, TensorBoard, W&B alike), never a writer thread that dies and leaves the
training loop blocked behind its queue, and never a traceback."""

import errno
import os
import pathlib
import subprocess
import sys
import threading

import pytest
from helpers.tmpfs import mounted_tmpfs

from llama2_jax.training import tracking

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 100 KB tmpfs (root only): writes past it fail with ENOSPC."""
    with mounted_tmpfs(tmp_path / "disk", "size=100k") as mount_point:
        yield mount_point


def fill(directory: pathlib.Path) -> None:
    """Use up the file system of `directory`."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC


def finishes_within(seconds: float, function) -> BaseException | None:
    """Run `function` in a daemon thread; fail the test if it is still running after `seconds` (a hang). Returns the
    exception it raised, or None."""
    outcome = {}

    def run():
        try:
            function()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return outcome.get("error")


def test_tensorboard_on_a_full_disk_stops_at_once_naming_the_file_and_the_checkpoint(tmp_path, tiny_disk, capfd):
    work = tmp_path / "work"
    (work / "checkpoints" / "4").mkdir(parents=True)  # a finished save
    (work / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # an unfinished one is not "good"
    (work / "tensorboard").symlink_to(tiny_disk)  # only the TensorBoard events are on the small disk
    fill(tiny_disk)
    tracker = tracking.Tracker(str(work))

    def log_many_steps():  # tensorboardX's writer thread queued 10 events before add_scalar blocked for ever
        for step in range(1, 200):
            tracker.write(step, {f"metric_{i}": float(i) for i in range(20)})

    error = finishes_within(20, log_many_steps)
    assert isinstance(error, tracking.WriterError), error
    message = str(error)
    assert "\n" not in message and message.startswith("writing the metrics of step 1 to ")
    assert f"{work / 'tensorboard'}/events.out.tfevents." in message and "(no space left on the device)" in message
    assert message.endswith(f"; last good checkpoint: step 4 ({work / 'checkpoints'})")
    assert tracker.backends == []  # every writer closed: nothing is flushed (and fails again) at exit
    assert "Traceback" not in capfd.readouterr().err


class Failing:
    path = "/somewhere/wandb"

    def write(self, step, metrics):
        raise RuntimeError("wandb service died\nwith a second line")

    def close(self):
        raise AssertionError("not called: the failed writer is closed by the tracker without raising again")


def test_any_writer_that_raises_stops_with_one_line(tmp_path):
    tracker = tracking.Tracker(str(tmp_path))
    tracker.backends.append(Failing())
    with pytest.raises(tracking.WriterError) as error:
        tracker.write(3, {"loss": 1.0})
    assert str(error.value) == ("writing the metrics of step 3 to /somewhere/wandb failed (wandb service died); "
                                "no checkpoint saved yet")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 3, "loss": 1.0}\n'  # the writers before it wrote


def test_a_failed_final_flush_is_reported_at_close(tmp_path):
    class FailsAtClose:
        path = str(tmp_path / "events")

        def write(self, step, metrics):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    tracker = tracking.Tracker(str(tmp_path))
    tracker.backends.insert(0, FailsAtClose())
    with pytest.raises(tracking.WriterError, match=r"^closing to .*/events failed \(no space left on the device\); "):
        tracker.close()


def run_pretrain(workdir, *overrides, **popen):
    args = [sys.executable, "-m", "train.pretrain", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--config.model.vocab_size=512", "--config.tokenizer.train_vocab_size=512", "--config.model.dim=64",
            "--config.model.n_layers=2", "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
            "--config.seq_len=32", "--config.batch_size=8", "--config.progress_bar=False", "--config.warmup_steps=2",
            "--config.log_every_steps=1", *overrides]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


@pytest.mark.slow  # ~30 s: trains a tokenizer and compiles a tiny model
def test_pretraining_on_a_100_kb_disk_stops_with_one_line(tiny_disk):
    """The probe that used to hang: metrics outgrow a 100 KB disk long before the first checkpoint."""
    proc = run_pretrain(tiny_disk / "work", "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
                        "--config.eval_every_steps=100000")
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "Exception" not in err, err[-3000:]
    assert lines[-1].startswith("error: writing the metrics of step ") and "(no space left on the device)" in lines[-1]
    assert lines[-1].endswith("; no checkpoint saved yet") and str(tiny_disk / "work") in lines[-1]
