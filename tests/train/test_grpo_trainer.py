"""train.grpo end to end: a tiny SFT policy trained here on single-digit addition (llama2_jax.data.arithmetic), then a
short GRPO run with the exact-match reward raises held-out exact-match accuracy; config errors are one-line
ConfigErrors before anything compiles; RLOO with a reference runs, and a second run resumes from the checkpoint."""

import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import grpo_7b, grpo_tiny
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.data import arithmetic
from llama2_jax.inference import decode, generate
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.text import chat_format as chat
from llama2_jax.text.tokenizer import train_tokenizer
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.rlhf_setup import Rewards
from train import grpo

CFG = LlamaConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                  dtype="float32")
TASK = arithmetic.ArithmeticTask(num_train=70, num_heldout=30, max_operand=9, operations="+", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    train, held = arithmetic.make_problems(TASK)
    texts = [f"[INST] {r['prompt']} [/INST] {r['answer']}" for r in train + held] * 4 + ["[INST] <<SYS>> [/INST]"]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer") / "spm", CFG.vocab_size, num_threads=1)


def sft_params(tokenizer, records, steps: int, learning_rate: float = 3e-3, seed: int = 0):
    """A next-token fine-tune on the answers of `records` (full batch, Adam): the SFT policy GRPO starts from."""
    encoded = [chat.encode_dialog_for_training(tokenizer, arithmetic.sft_record(r)["messages"]) for r in records]
    width = max(len(t) for t, _ in encoded)
    ids = np.zeros((len(encoded), width), np.int32)
    mask = np.zeros((len(encoded), width), np.float32)
    for row, (tokens, loss_mask) in enumerate(encoded):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, loss_mask
    model = Llama(CFG)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    tx = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = model.apply({"params": p}, ids[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
            return jnp.sum(ce * mask[:, 1:]) / jnp.sum(mask[:, 1:])
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params


def greedy_accuracy(params, cfg, tokenizer, records) -> float:
    """Exact-match accuracy of greedy answers (independent of the trainer's own evaluation)."""
    encoded = [chat.encode_dialog(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in records]
    tokens, lengths = generate.pad_prompts(encoded, generate.META_PAD_ID, 32, bucket=32)
    out = jax.device_get(decode.sample_jit(params, cfg, tokens, lengths, jax.random.PRNGKey(0), max_gen_len=4,
                                           temperature=0.0, eos_id=tokenizer.eos_id))
    answers = [tokenizer.decode([int(t) for t in row[s:s + n]])
               for row, s, n in zip(out["tokens"], out["prompt_lens"], out["lengths"])]
    rewards = arithmetic.exact_match([r["prompt"] for r in records], answers, answer=[r["answer"] for r in records])
    return float(np.mean(rewards))


def save_sft(path, params, tokenizer):
    checkpoint.save_params(path, params, CFG)
    (path / "tokenizer.model").write_bytes(pathlib.Path(tokenizer.model_path).read_bytes())
    return path


def tiny_config(init_from):
    config = grpo_tiny.get_config()
    config.init_from = str(init_from)
    config.arithmetic.update(dataclass_fields(TASK))
    config.progress_bar = False
    return config


def dataclass_fields(task):
    return {name: getattr(task, name) for name in ("num_train", "num_heldout", "min_operand", "max_operand",
                                                   "operations", "seed")}


def test_configs_and_bad_fields_are_one_line_errors():
    config = grpo_7b.get_config()
    assert (config.grpo.num_generations, config.grpo.beta, config.learning_rate, config.batch_size,
            config.sampling.max_gen_len, config.grpo.epochs) == (64, 0.04, 1e-6, 1024, 1024, 1)  # DeepSeekMath 4.1
    config = grpo_tiny.get_config()
    grpo.check_fields(config)
    for field, value, message in [
            ("grpo.num_generations", 1, "config.grpo.num_generations must be an integer >= 2"),
            ("grpo.num_generations", 5, "does not divide the 128 completions"),
            ("grpo.variant", "ppo", "config.grpo.variant='ppo'"),
            ("grpo.scale_rewards", "token", "config.grpo.scale_rewards must be one of"),
            ("grpo.aggregation", "seq", "config.grpo.aggregation='seq'"),
            ("grpo.beta", -0.1, "beta (-0.1) must be >= 0"),
            ("minibatch_size", 48, "config.minibatch_size (48) must divide"),
            ("sampling.top_p", 0.9, "top_p (0.9) 1"),
            ("prompts.source", "hub", "config.prompts.source='hub'"),
            ("reward.fn", "no_such_module:f", "config.reward.fn='no_such_module:f': cannot import"),
            ("reward.weights", "1,2", "config.reward.weights has 2 weights for the 1 functions"),
            ("arithmetic.num_train", 1000, "config.arithmetic: num_train + num_heldout")]:
        bad = grpo_tiny.get_config()
        section, _, name = field.rpartition(".")
        (bad[section] if section else bad)[name] = value
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            grpo.check_fields(bad)
        assert "\n" not in str(error.value)
    no_reward = grpo_tiny.get_config()
    no_reward.reward.fn = ""
    with pytest.raises(ConfigError, match="config.reward: no reward"):
        grpo.check_fields(no_reward)


def sampled_reward(params, cfg, tokenizer, records, samples: int = 8, seed: int = 0) -> float:
    """Mean exact-match reward of `samples` answers per prompt at temperature 1 (the distribution GRPO optimises),
    with a fixed sampling key."""
    records = [r for r in records for _ in range(samples)]
    encoded = [chat.encode_dialog(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in records]
    tokens, lengths = generate.pad_prompts(encoded, generate.META_PAD_ID, 32, bucket=32)
    out = jax.device_get(decode.sample_jit(params, cfg, tokens, lengths, jax.random.PRNGKey(seed), max_gen_len=4,
                                           temperature=1.0, eos_id=tokenizer.eos_id))
    answers = [tokenizer.decode([int(t) for t in row[s:s + n]])
               for row, s, n in zip(out["tokens"], out["prompt_lens"], out["lengths"])]
    return float(np.mean(arithmetic.exact_match([r["prompt"] for r in records], answers,
                                                answer=[r["answer"] for r in records])))


def longer_is_better(params, tokens, lengths):
    """Stand-in reward model: a sigmoid score that grows with the sequence length (params unused)."""
    del params, tokens
    return jax.nn.sigmoid(lengths.astype(jnp.float32) / 4.0 - 5.0)


STAND_IN_REWARDS = Rewards({"helpful": longer_is_better, "safety": lambda params, tokens, lengths: jnp.full(
    tokens.shape[:1], 0.9)}, {"helpful": None, "safety": None})


@pytest.fixture(scope="module")
def sft_policy(tokenizer, tmp_path_factory):
    """(SFT params, their workdir): 100 full-batch Adam steps on the 70 training problems (~20 s)."""
    train, _ = arithmetic.make_problems(TASK)
    params = sft_params(tokenizer, train, steps=100)
    return params, save_sft(tmp_path_factory.mktemp("sft"), params, tokenizer)


@pytest.mark.slow
def test_grpo_raises_the_sampled_exact_match_reward_of_the_sft_policy(tmp_path, tokenizer, sft_policy):
    """configs/grpo_tiny.py for 20 iterations from the SFT policy. Measured (2-core CPU, seed 0): sampled reward on
    the training prompts 0.368 / 0.429 (keys 0 / 1) -> 0.488 / 0.488, held-out sampled 0.275 -> 0.354; greedy
    exact match did not move (train 0.73 -> 0.76, held-out 0.40 -> 0.40), so the sampled reward is what is asserted."""
    params, sft_dir = sft_policy
    train, held = arithmetic.make_problems(TASK)
    before = np.mean([sampled_reward(params, CFG, tokenizer, train, seed=s) for s in (0, 1)])
    config = tiny_config(sft_dir)
    config.eval_every_iterations = 20  # one held-out evaluation, at the end
    work = tmp_path / "grpo"
    history = grpo.train(config, str(work)).history

    assert [h["step"] for h in history] == list(range(1, 21))
    for key in ("reward_mean", "reward_std", "reward_exact_match_mean", "reward_exact_match_std", "zero_std_fraction",
                "clipfrac", "answer_length_mean", "answer_length_max", "truncated_fraction",
                "generation_tokens_per_s", "loss"):
        assert all(np.isfinite(h[key]) for h in history), key
    assert "eval_reward_mean" in history[19] and 0 <= history[19]["eval_reward_mean"] <= 1
    assert history[-1]["policy_step"] == 20 * 4 and "kl" not in history[-1]  # beta = 0: no reference, no KL
    assert all(h["reward_failures"] == 0 for h in history)
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))

    trained, cfg = checkpoint.load_params(work)  # the workdir is an init_from
    after = np.mean([sampled_reward(trained, cfg, tokenizer, train, seed=s) for s in (0, 1)])
    assert after > before + 0.05, (before, after)  # measured 0.398 -> 0.488
    del held


@pytest.mark.slow
def test_rloo_with_a_reference_and_reward_models_runs_and_a_second_run_resumes(tmp_path, sft_policy):
    """RLOO with beta > 0 (the reference kept, KL in the reward), exact match plus a stand-in reward-model pair:
    2 iterations checkpointed; the same command with iterations = 3 continues at iteration 3 from the checkpoint."""
    config = tiny_config(sft_policy[1])
    config.grpo.variant, config.grpo.beta = "rloo", 0.05
    config.iterations, config.checkpoint_every_iterations, config.eval_every_iterations = 2, 1, 0
    config.reward.rm_weight = 0.5
    work = tmp_path / "rloo"
    first = grpo.train(config, str(work), STAND_IN_REWARDS).history
    assert [h["step"] for h in first] == [1, 2] and abs(first[0]["kl"]) < 1e-4  # π = π_ref at the first rollout
    for row in first:  # the reward models' whitened logit: mean 0, std 1 over the batch
        assert abs(row["reward_rm_mean"]) < 1e-4 and abs(row["reward_rm_std"] - 1.0) < 1e-3, row
        assert abs(row["reward_mean"] - row["reward_exact_match_mean"]) < 1e-4  # + 0.5 x a zero-mean reward
    config.iterations = 3
    second = grpo.train(config, str(work), STAND_IN_REWARDS).history
    assert [h["step"] for h in second] == [3] and second[0]["policy_step"] == 3 * 4
