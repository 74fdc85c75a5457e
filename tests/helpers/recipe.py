"""A shortened train.recipe config (tiny model, a few steps per stage) for the recipe's end-to-end tests."""

import os

from conftest import shared_file

from configs import recipe_tiny


def short_recipe():
    """recipe_tiny with a 2-layer, 64-wide model and a few steps per stage, one RLHF pass (the rounds:
    tests/train/test_recipe_rounds.py)."""
    config = recipe_tiny.get_config()
    config.rlhf.rounds = 0
    config.data_dir = os.path.dirname(shared_file("oasst-en-100-pairs.jsonl"))
    shared_file("piqa-valid-with-labels.jsonl")  # skips (naming the file) where it is absent
    config.eval.limit, config.eval.stages = 20, "pretrain,cd"  # PIQA after the first and the last stage
    ckpt = "--config.checkpoint_every_steps=2 --config.eval_every_steps=2 --config.eval_batches=1"
    config.stages.pretrain.extra = ("--config.num_train_steps=4 --config.model.dim=64 --config.model.n_layers=2 "
                                    f"--config.model.n_heads=4 --config.model.n_kv_heads=4 --config.batch_size=8 "
                                    f"{ckpt}")
    config.stages.sft.extra = f"--config.num_train_steps=2 --config.seq_len=128 {ckpt}"
    for name in ("rm_helpful", "rm_safety"):
        config.stages[name].extra = f"--config.num_train_steps=2 --config.seq_len=128 --config.batch_size=8 {ckpt}"
    config.stages.rs.extra = ("--config.prompts.max_prompts=4 --config.sampling.num_samples=2 "
                              "--config.sampling.batch_size=8 --config.sampling.max_gen_len=8 "
                              "--config.sft.num_train_steps=2 --config.sft.checkpoint_every_steps=2")
    config.stages.ppo.extra = ("--config.iterations=4 --config.prompts.max_prompts=40 --config.batch_size=8 "
                               "--config.minibatch_size=8 --config.sampling.max_gen_len=8")
    config.stages.gatt.extra = ("--config.sft.num_train_steps=2 --config.sft.seq_len=128 "
                                "--config.sft.checkpoint_every_steps=2 --config.sft.eval_every_steps=2 "
                                "--config.sft.eval_batches=1")
    config.stages.cd.extra = ("--config.prompts.max_prompts=4 --config.sampling.batch_size=8 "
                              "--config.sampling.max_gen_len=8 --config.sft.num_train_steps=2 "
                              "--config.sft.checkpoint_every_steps=2 --config.sft.seq_len=128 "
                              "--config.prompts.max_prompt_len=112")  # + 8 new tokens <= the 128-token model
    return config
