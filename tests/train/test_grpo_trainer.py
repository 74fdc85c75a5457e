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
import orbax.checkpoint as ocp
import pytest

from configs import grpo_7b, grpo_rm_tiny, grpo_tiny
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.data import arithmetic
from llama2_jax.inference import decode, generate
from llama2_jax.model import score as score_model
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.text import chat_format as chat
from llama2_jax.text.tokenizer import train_tokenizer
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.rlhf_setup import Rewards
from train import grpo

CFG = LlamaConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                  dtype="float32")
TASK = arithmetic.ArithmeticTask(num_train=70, num_heldout=30, max_operand=9, operations="+", seed=0)
RM_ITERATIONS, RM_MARGIN = 8, 0.2  # held-out Rc measured 0.346 -> 0.761


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
            ("grpo.num_generations", 5, "does not divide the 256 completions"),
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


def sampled_reward(params, cfg, tokenizer, records, samples: int = 8, seed: int = 0, temperature: float = 1.0
                   ) -> float:
    """Mean exact-match reward of `samples` answers per prompt at `temperature` (the config's: the distribution GRPO
    optimises), with a fixed sampling key."""
    records = [r for r in records for _ in range(samples)]
    encoded = [chat.encode_dialog(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in records]
    tokens, lengths = generate.pad_prompts(encoded, generate.META_PAD_ID, 32, bucket=32)
    out = jax.device_get(decode.sample_jit(params, cfg, tokens, lengths, jax.random.PRNGKey(seed), max_gen_len=4,
                                           temperature=temperature, eos_id=tokenizer.eos_id))
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


SFT_STEPS = 75  # an SFT policy that has started to learn the task (greedy exact match: train 0.34, held-out 0.10)
HELD_OUT_MARGIN = 0.1  # asserted rise of held-out greedy exact match; measured below


@pytest.fixture(scope="module")
def sft_policy(tokenizer, tmp_path_factory):
    """(SFT params, their workdir): SFT_STEPS full-batch Adam steps on the 70 training problems (~15 s). At 100 steps
    (train 0.73, held-out 0.40) GRPO sharpened the sampled answers but moved no greedy answer on the held-out
    problems; from a policy that has only started to learn the task, GRPO's reward on the training prompts does."""
    train, _ = arithmetic.make_problems(TASK)
    params = sft_params(tokenizer, train, steps=SFT_STEPS)
    return params, save_sft(tmp_path_factory.mktemp("sft"), params, tokenizer)


@pytest.mark.slow
def test_grpo_raises_the_held_out_exact_match_of_the_sft_policy(tmp_path, tokenizer, sft_policy):
    """configs/grpo_tiny.py for 20 iterations from the SFT policy: greedy exact match on the 30 held-out problems
    (never prompted during GRPO) rises, and so does the sampled reward on the training prompts. Measured (2-core CPU,
    seed 0): held-out 0.133 -> 0.300 (0.100 -> 0.267 in another process: the SFT policy is at a point where float
    rounding flips a greedy answer), sampled train reward 0.219 -> 0.391; SFT and GRPO seeds 1 / 2: held-out
    0.167 -> 0.400 / 0.233 -> 0.267."""
    params, sft_dir = sft_policy
    train, held = arithmetic.make_problems(TASK)
    config = tiny_config(sft_dir)
    temperature = config.sampling.temperature
    before = np.mean([sampled_reward(params, CFG, tokenizer, train, seed=s, temperature=temperature) for s in (0, 1)])
    held_before = greedy_accuracy(params, CFG, tokenizer, held)
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
    after = np.mean([sampled_reward(trained, cfg, tokenizer, train, seed=s, temperature=temperature) for s in (0, 1)])
    assert after > before + 0.05, (before, after)  # measured 0.219 -> 0.391 (T = 0.7)
    held_after = greedy_accuracy(trained, cfg, tokenizer, held)
    assert abs(history[19]["eval_reward_mean"] - held_after) < 1e-6  # the trainer's held-out evaluation agrees
    print(f"held-out greedy exact match {held_before:.3f} -> {held_after:.3f}, sampled train reward {before:.3f} -> "
          f"{after:.3f}")
    assert held_after >= held_before + HELD_OUT_MARGIN, (held_before, held_after)


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


def target_token_lover(params, tokens, lengths):
    """Stand-in helpfulness RM: sigmoid(2 x (tokens of the sequence with id % 8 == 3) - 3), a visible property of
    the answer (as tests/train/test_ppo.py's stand-in; params unused)."""
    del params
    real = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return jax.nn.sigmoid(2.0 * jnp.sum((tokens % 8 == 3) & real, axis=1) - 3.0)


RM_PAIR = Rewards({"helpful": target_token_lover, "safety": lambda params, tokens, lengths: jnp.full(
    tokens.shape[:1], 0.9)}, {"helpful": None, "safety": None})  # Rs 0.9 >= 0.15, no prompt tagged: Rc = Rh


def held_out_combined(params, cfg, tokenizer, records, rewards) -> float:
    """Mean Rc of the reward-model pair on greedy answers (independent of the trainer's evaluation)."""
    encoded = [chat.encode_dialog(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in records]
    tokens, lengths = generate.pad_prompts(encoded, generate.META_PAD_ID, 32, bucket=32)
    out = decode.sample_jit(params, cfg, tokens, lengths, jax.random.PRNGKey(0), max_gen_len=4, temperature=0.0,
                            eos_id=tokenizer.eos_id)
    ids, score_lens = rlhf.scoring_sequences(out["tokens"], out["prompt_lens"], out["lengths"], tokenizer.eos_id)
    scores = rlhf.score_sequences(rewards.fns, rewards.params, ids, score_lens, jnp.zeros(len(records), bool))
    return float(jnp.mean(scores["combined"]))


@pytest.mark.slow
def test_grpo_with_the_reward_model_pair_raises_the_held_out_combined_reward(tmp_path, tokenizer, sft_policy):
    """The tiny run with the reward-model pair as its only reward (reward.fn empty; Rc whitened, as PPO) raises the
    mean Rc of greedy answers to the held-out prompts. Measured (seed 0): 0.346 -> 0.761 in 8 iterations."""
    params, sft_dir = sft_policy
    _, held = arithmetic.make_problems(TASK)
    before = held_out_combined(params, CFG, tokenizer, held, RM_PAIR)
    config = tiny_config(sft_dir)
    config.reward.fn, config.iterations, config.eval_every_iterations = "", RM_ITERATIONS, RM_ITERATIONS
    history = grpo.train(config, str(tmp_path / "grpo_rm"), RM_PAIR).history
    last = history[-1]
    assert "reward_exact_match_mean" not in last and abs(last["reward_rm_mean"]) < 1e-4  # whitened over the batch
    assert last["eval_reward_combined_mean"] == last["eval_reward_helpful_mean"]  # Rs = 0.9, untagged: Rc = Rh
    trained, cfg = checkpoint.load_params(tmp_path / "grpo_rm")
    after = held_out_combined(trained, cfg, tokenizer, held, RM_PAIR)
    assert abs(after - last["eval_reward_combined_mean"]) < 1e-4  # the trainer's held-out evaluation agrees
    print(f"held-out Rc {before:.4f} -> {after:.4f}; training Rc",
          [round(h["reward_combined_mean"], 3) for h in history])
    assert after > before + RM_MARGIN, (before, after)


@pytest.mark.slow
def test_grpo_rm_tiny_config_runs_on_a_prompt_file_with_reward_model_checkpoints(tmp_path, tokenizer, sft_policy):
    """configs/grpo_rm_tiny.py (the recipe's grpo stage) as its command runs it: prompts from a JSONL file (some
    tagged is_safety), the reward models loaded from checkpoints (train.reward's layout: a score head on the SFT
    trunk), beta > 0 (the reference kept); one iteration and its held-out evaluation."""
    params, sft_dir = sft_policy
    rm_dir = tmp_path / "rm"
    rm_params = score_model.init_score_params_from_llama(params, jax.random.PRNGKey(1), head_init_std=0.5)
    with ocp.StandardCheckpointer() as saver:
        saver.save((rm_dir / "params").absolute(), jax.device_get(rm_params))
    (rm_dir / "llama_config.json").write_text(json.dumps(CFG.to_dict()))
    train, _ = arithmetic.make_problems(TASK)
    arithmetic.write_jsonl(tmp_path / "prompts.jsonl", [{**r, "is_safety": i % 4 == 0} for i, r in enumerate(train)])
    config = grpo_rm_tiny.get_config()
    config.init_from, config.progress_bar = str(sft_dir), False
    config.reward.helpful_path = config.reward.safety_path = str(rm_dir)
    config.prompts.path, config.prompts.max_prompt_len, config.sampling.max_gen_len = (
        str(tmp_path / "prompts.jsonl"), 32, 4)  # the 64-token test model
    config.iterations, config.eval_every_iterations = 1, 1
    history = grpo.train_and_evaluate(config, str(tmp_path / "grpo")).history
    row = history[0]
    assert "reward_exact_match_mean" not in row and abs(row["reward_rm_mean"]) < 1e-4  # RMs only, whitened
    assert 0 < row["reward_combined_mean"] < 1 and 0 < row["eval_reward_combined_mean"] < 1
    assert row["reward_helpful_mean"] == row["reward_safety_mean"]  # one checkpoint for both, as the tiny recipe
    assert row["policy_step"] == 2  # 32 answers, minibatches of 16, one epoch
    assert 0 <= row["kl"] < 0.05  # k3 >= 0, averaged over the 2 steps (0 at the first): measured 0.0026
