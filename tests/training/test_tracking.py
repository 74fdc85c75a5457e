"""llama2_jax.training.tracking's Tracker (metrics.jsonl, TensorBoard and W&B offline get the same scalars; a resumed run continues the
same W&B run) and Profiler (`config.profile_steps` writes a jax.profiler trace)."""

import gzip
import json
import os
import pathlib
import struct
import time

import pytest
from helpers.trainers import tensorboard_scalars

from llama2_jax.checkpoints.layout import WANDB_RUN_ID_FILE
from llama2_jax.training import loop, run_dir, tokenizer_setup, tracking
from llama2_jax.training.checks import ConfigError

WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of chunks with 7-byte headers
WANDB_HEADER = 7  # ":W&B", a 2-byte magic number and a 1-byte version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path):
    """The protobuf `Record`s of a .wandb file, read with wandb's own message definitions."""
    from wandb.proto import wandb_internal_pb2

    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = WANDB_HEADER, b""
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # too little room for a chunk header: the block is padded
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding at the end of a block
            continue
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def complete_wandb_records(path, timeout=60.0):
    """The records of a run file once its final `exit` record is there (wandb's service may still be flushing it
    when `run.finish()` returns)."""
    deadline = time.time() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(workdir):
    """{run id: {step: {name: value}}} over every offline run directory under WORKDIR/wandb."""
    runs = {}
    for path in sorted(pathlib.Path(workdir, "wandb").glob("offline-run-*/run-*.wandb")):
        run_id = path.stem.removeprefix("run-")
        for record in complete_wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                metrics = {k: v for k, v in items.items() if not k.startswith("_")}
                runs.setdefault(run_id, {}).setdefault(record.history.step.num, {}).update(metrics)
    return runs


def jsonl_metrics(workdir):
    """{step: metrics}, the train and eval records of a step merged (as W&B merges the logs of one step)."""
    merged = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            merged.setdefault(record.pop("step"), {}).update(record)
    return merged


def test_tracker_sends_the_same_scalars_to_jsonl_tensorboard_and_wandb(tmp_path):
    pytest.importorskip("wandb", reason="needs the [wandb] extra: pip install -e .[wandb]")
    tracker = tracking.Tracker(str(tmp_path), tracking.WandbSettings(project="llama2-jax-test", mode="offline"), {"seed": 3})
    logged = {1: {"loss": 2.5, "learning_rate": 1e-4}, 2: {"loss": 2.25, "learning_rate": 2e-4}, 3: {"eval_loss": 2.0}}
    for step, metrics in logged.items():
        tracker.write(step, metrics)
    tracker.close()
    assert jsonl_metrics(tmp_path) == logged
    (run_id,) = wandb_history(tmp_path)
    assert wandb_history(tmp_path)[run_id] == logged
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    tensorboard = tensorboard_scalars(tmp_path)
    assert {s: {k: pytest.approx(v, rel=1e-6) for k, v in m.items()} for s, m in logged.items()} == tensorboard


@pytest.mark.parametrize("field, value, message", [
    ("profile_steps", "3", "config.profile_steps is '3', expected START:STOP"),
    ("profile_steps", "5:2", "config.profile_steps is '5:2'"),
    ("profile_steps", "0:2", "config.profile_steps is '0:2'"),
    ("wandb.mode", "online-ish", "config.wandb.mode is 'online-ish', expected one of online, offline, disabled"),
])
def test_bad_tracking_fields_are_one_line_config_errors(field, value, message):
    from configs import tiny

    config = tiny.get_config()
    *parents, leaf = field.split(".")
    (config[parents[0]] if parents else config)[leaf] = value
    with pytest.raises(ConfigError, match=message):
        loop.LoopSettings.from_config(config)


def assert_one_trace_of_compiled_programs(workdir):
    """WORKDIR/profile holds one jax.profiler trace in which compiled programs ran on the devices."""
    traces = list(pathlib.Path(workdir, "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    (trace_json,) = traces[0].parent.glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(trace_json.read_bytes()))["traceEvents"]
    executed = [e for e in events if "Execute (jit_" in e.get("name", "")]
    assert executed  # compiled programs (the train step) ran on the devices inside the window


@pytest.mark.slow
def test_pretraining_logs_to_wandb_offline_resumes_its_run_and_profiles_steps(tmp_path):
    pytest.importorskip("wandb", reason="needs the [wandb] extra: pip install -e .[wandb]")
    from helpers.trainers import small_config

    from train import pretrain

    config = small_config(**{"wandb.project": "llama2-jax-test", "wandb.mode": "offline", "profile_steps": "2:3",
                             "num_train_steps": 4, "async_checkpoints": False, "sample_prompts": ()})
    pretrain.train_and_evaluate(config, str(tmp_path))
    assert_one_trace_of_compiled_programs(tmp_path)

    config.num_train_steps = 6  # resume the same workdir for two more steps
    pretrain.train_and_evaluate(config, str(tmp_path))
    runs = wandb_history(tmp_path)
    assert list(runs) == [(tmp_path / WANDB_RUN_ID_FILE).read_text().strip()]  # one W&B run across both
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    assert runs[next(iter(runs))] == jsonl_metrics(tmp_path)  # every logged scalar of steps 1..6, exactly
    assert sorted(jsonl_metrics(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_pretraining_rejects_a_bad_profile_window_before_loading_anything(tmp_path):
    from helpers.trainers import small_config

    from train import pretrain

    config = small_config(**{"profile_steps": "2-3", "data.source": "jsonl", "data.path": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match=r"^config.profile_steps is '2-3'"):
        pretrain.train_and_evaluate(config, str(tmp_path / "work"))


@pytest.mark.slow
def test_ppo_profiles_its_iterations_and_logs_through_the_tracker(tmp_path):
    from helpers.ppo_run import constant_safety, prefers_target_tokens
    from helpers.ppo_run import tiny_config as ppo_config
    from helpers.rlhf_models import make_tokenizer

    from llama2_jax.training.rlhf_setup import Rewards
    from train import ppo

    (tmp_path / "tok").mkdir()
    config = ppo_config(tmp_path, make_tokenizer(tmp_path / "tok"))
    config.iterations, config.eval_every_iterations, config.checkpoint_every_iterations = 2, 2, 2
    config.profile_steps = "2:2"  # the second PPO iteration (rollout, scoring and updates)
    work = tmp_path / "ppo"
    history = ppo.train(config, str(work), Rewards({"helpful": prefers_target_tokens, "safety": constant_safety},
                                                   {"helpful": None, "safety": None})).history
    assert_one_trace_of_compiled_programs(work)
    logged = jsonl_metrics(work)
    assert sorted(logged) == [1, 2] and logged[2]["kl"] == history[1]["kl"]
    assert tensorboard_scalars(work)[2]["reward_combined"] == pytest.approx(history[1]["reward_combined"], rel=1e-6)


@pytest.mark.parametrize("trainer", ["sft", "reward"])
def test_sft_and_reward_reject_a_bad_profile_window_before_reading_anything(tmp_path, monkeypatch, trainer):
    from configs import rm_tiny, sft_tiny
    from train import reward, sft

    def fail(*args, **kwargs):
        raise AssertionError("read or compiled before the config error")

    monkeypatch.setattr(tokenizer_setup, "Tokenizer", fail)
    monkeypatch.setattr(run_dir, "write_workdir", fail)
    data = tmp_path / "data.jsonl"
    data.write_text("")  # never read: the error comes first
    config = (sft_tiny if trainer == "sft" else rm_tiny).get_config()
    config.data.path, config.profile_steps = str(data), "2-3"
    module = sft if trainer == "sft" else reward
    with pytest.raises(ConfigError, match=r"^config.profile_steps is '2-3'"):
        module.train_and_evaluate(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()
