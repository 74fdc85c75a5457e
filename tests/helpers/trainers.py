"""Small trainer inputs and outputs shared across folders: train.pretrain's tiny config, the losses a run logs to
metrics.jsonl and the scalars it writes to TensorBoard, and a random tiny checkpoint in the params-only layout the
trainers' init_from reads."""

import json
import os
import pathlib
import shutil
import struct

from conftest import random_llama_params

from configs import tiny
from llama2_jax.checkpoints import params_io as checkpoint


def small_config(**overrides):
    config = tiny.get_config()
    config.model.update(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32)
    config.tokenizer.train_vocab_size = 512
    config.update(seq_len=32, batch_size=8, num_train_steps=8, warmup_steps=2, log_every_steps=1,
                  eval_every_steps=4, eval_batches=2, checkpoint_every_steps=4, progress_bar=False,
                  sample_prompts=("The",), sample_tokens=4)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def save_tiny_checkpoint(path, cfg, tokenizer_file=None):
    checkpoint.save_params(path, random_llama_params(cfg), cfg)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, path / "tokenizer.model")


def tensorboard_scalars(workdir):
    """{step: {tag: value}} from the TFRecord-framed event files in WORKDIR/tensorboard."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in pathlib.Path(workdir, "tensorboard").glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the event, its crc
            for value in event.summary.value:
                scalars.setdefault(event.step, {})[value.tag] = value.simple_value
    return scalars
