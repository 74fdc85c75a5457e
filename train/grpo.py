r"""GRPO (Shao et al. 2024, DeepSeekMath, section 4.1) and RLOO (Ahmadian et al. 2024) without a critic:
`python -m train.grpo --config=configs/grpo_tiny.py --workdir=DIR --config.init_from=SFT_DIR`.

One iteration (one step of the shared loop, as in train/ppo.py):
  1. sample G = config.grpo.num_generations answers to each of config.batch_size / G prompts with the policy's current
     weights (config.rollout.engine: decode slots, `rlhf.rollout.sample_with_slots`, or the compiled fixed-batch
     sampler `decode.sample`; rows p·G .. p·G + G - 1 answer prompt p);
  2. rewards on the host: the Python reward functions of config.reward.fn (`llama2_jax.rlhf.reward_functions`: the
     contract, weights, the fallback of a failing call) and/or the Llama 2 reward-model pair (config.reward.helpful_path
     / safety_path: the piecewise combination, whitened logit, as PPO) with weight config.reward.rm_weight;
  3. advantages per group (`rlhf.group`): GRPO's group-normalised rewards (config.grpo.scale_rewards) or RLOO's
     leave-one-out baseline on the KL-penalised reward (config.grpo.variant = "rloo");
  4. config.grpo.epochs passes of shuffled minibatches of config.minibatch_size completions, one optimizer step each,
     with `losses.grpo_loss` / `losses.rloo_loss` and importance ratios against the behaviour policy (the log-probs
     of step 1's weights). With beta = 0 no reference model is kept in memory.

Metrics per iteration (metrics.jsonl, TensorBoard, the printed line): reward_mean / reward_std (total) and
reward_<name>_mean / _std per reward (reward_rm: the reward models' whitened logit), with reward models also
reward_combined_mean / reward_helpful_mean / reward_safety_mean (their sigmoid scores before whitening, comparable
across iterations), reward_failures, zero_std_fraction (groups without learning signal), kl (k3 to the reference; only
with beta > 0), clipfrac, ratio, entropy, loss, answer_length_mean / _max, truncated_fraction, generation_tokens_per_s;
held-out eval_reward_mean and eval_reward_<name>_mean (greedy answers, every config.eval_every_iterations; with reward
models eval_reward_combined_mean is the held-out Rc). Checkpoints and resume as every trainer (WORKDIR/checkpoints;
the workdir is an init_from).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data import arithmetic
from llama2_jax.data import prompts as prompt_data
from llama2_jax.data.prompts import ShuffledEpochs
from llama2_jax.inference import decode, generate, slot_sampler
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import Llama
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.rlhf import group
from llama2_jax.rlhf import reward_functions as rf
from llama2_jax.rlhf import rollout
from llama2_jax.rlhf.rollout import action_mask
from llama2_jax.text import chat_format as chat
from llama2_jax.training import losses
from llama2_jax.training import state as train_state
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.hosts import ProcessRows
from llama2_jax.training.initial_state import init_state, make_tx
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.rlhf_setup import RewardCheckpoints
from llama2_jax.training.setup import Run, Task, setup

VARIANTS = ("grpo", "rloo")
SOURCES = ("file", "arithmetic")


def check_fields(config, reward_models_given: bool = False) -> None:
    """One-line ConfigErrors for the GRPO fields, before anything is read or compiled. reward_models_given: the
    caller passes reward models itself (`train`'s `rewards`, e.g. a stand-in), so reward.fn may be empty."""
    g = config.grpo
    if g.variant not in VARIANTS:
        raise ConfigError(f"config.grpo.variant={g.variant!r}; known: {', '.join(VARIANTS)}")
    group.check_group_size(g.num_generations, config.batch_size, field="config.grpo.num_generations")
    group.scale_rewards_mode(g.scale_rewards)
    if g.aggregation not in losses.GRPO_AGGREGATIONS:
        raise ConfigError(f"config.grpo.aggregation={g.aggregation!r}; known: {', '.join(losses.GRPO_AGGREGATIONS)}")
    if not g.beta >= 0 or not g.clip_low > 0 or (g.clip_high is not None and not g.clip_high > 0):
        raise ConfigError(f"config.grpo: beta ({g.beta}) must be >= 0, clip_low ({g.clip_low}) and clip_high "
                          f"({g.clip_high}) > 0")
    if g.epochs < 1 or config.iterations < 1:
        raise ConfigError(f"config.grpo.epochs ({g.epochs}) and config.iterations ({config.iterations}) must be >= 1")
    batch, mb = config.batch_size, config.minibatch_size
    if mb < 1 or batch % mb or mb % config.grad_accum_steps:
        raise ConfigError(f"config.minibatch_size ({mb}) must divide config.batch_size ({batch}) and be a multiple "
                          f"of config.grad_accum_steps ({config.grad_accum_steps})")
    if not config.sampling.temperature > 0 or config.sampling.top_p != 1.0:
        raise ConfigError(f"config.sampling: temperature ({config.sampling.temperature}) must be > 0 and top_p "
                          f"({config.sampling.top_p}) 1 (the loss's log-probs are those of softmax(logits / T))")
    if config.prompts.source not in SOURCES:
        raise ConfigError(f"config.prompts.source={config.prompts.source!r}; known: {', '.join(SOURCES)}")
    if config.prompts.source == "file" and not config.prompts.path:
        raise ConfigError("config.prompts.path is empty (or set config.prompts.source=arithmetic)")
    if config.prompts.source == "arithmetic":
        arithmetic_task(config).check()
    if config.eval_every_iterations < 0:
        raise ConfigError(f"config.eval_every_iterations={config.eval_every_iterations} must be >= 0 (0 = never)")
    if not config.reward.fn and not (reward_models_given or uses_reward_models(config)):
        raise ConfigError("config.reward: no reward: set config.reward.fn ('package.module:function') and/or "
                          "config.reward.helpful_path / safety_path")
    if config.reward.fn:
        rf.load_rewards(config.reward.fn, config.reward.weights or None, config.reward.fallback)
    rollout.check_engine(config)


def uses_reward_models(config) -> bool:
    return bool(config.reward.helpful_path or config.reward.safety_path)


def arithmetic_task(config) -> arithmetic.ArithmeticTask:
    return arithmetic.ArithmeticTask(**config.arithmetic.to_dict())


# ----------------------------------------------------------------------------------------------------------------------
# Prompts: records with their extra fields (what the reward functions receive)


@dataclasses.dataclass
class PromptSet:
    """Prompt records ({"prompt": str | messages, "is_safety"?, extra fields ...}) and their chat encodings."""
    records: list[dict]
    encoded: list[list[int]]

    def fields(self, indices) -> dict[str, list]:
        """The extra fields of the records at `indices` (one list per field; every record has every field)."""
        names = sorted({k for i in indices for k in self.records[i]} - {"prompt"})
        return {name: [self.records[i].get(name) for i in indices] for name in names}


def encode_records(records: list[dict], tokenizer, max_prompt_len: int, where: str) -> PromptSet:
    kept, encoded = [], []
    for line, record in enumerate(records, 1):
        try:
            prompt = prompt_data.prompt_from_record(record)
        except ValueError as error:
            raise ConfigError(f"{where}:{line}: {error}") from None
        tokens = chat.encode_dialog(tokenizer, prompt.messages)
        if len(tokens) <= max_prompt_len:
            kept.append(record)
            encoded.append(tokens)
    if not kept:
        raise ConfigError(f"{where}: no prompt fits in config.prompts.max_prompt_len={max_prompt_len}")
    return PromptSet(kept, encoded)


def read_records(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"config.prompts.path={path!r}: {error}") from None


class GroupBatches:
    """Endless shuffled epochs over the prompts; next() -> {"tokens" [B, W], "lengths" [B], "index" [B]} with each
    prompt repeated G times in adjacent rows (B = P·G). get_state / set_state for resuming."""

    def __init__(self, prompts: PromptSet, prompts_per_batch: int, num_generations: int, width: int, seed: int):
        self.prompts, self.per_batch, self.g, self.width = prompts, prompts_per_batch, num_generations, width
        self.order = ShuffledEpochs(len(prompts.encoded), seed)

    def __next__(self) -> dict[str, np.ndarray]:
        picked = self.order.take(self.per_batch)
        index = np.repeat(np.array(picked, np.int32), self.g)
        tokens, lengths = generate.pad_prompts([self.prompts.encoded[i] for i in index], generate.META_PAD_ID,
                                               self.width, bucket=self.width)
        return {"tokens": tokens, "lengths": lengths, "index": index}

    next = __next__

    def get_state(self) -> dict:
        return self.order.get_state()

    def set_state(self, state: dict) -> None:
        self.order.set_state(state)


@dataclasses.dataclass
class Prompts:
    train: GroupBatches
    held_out: PromptSet | None


def make_data(config, tokenizer, raw=None) -> Prompts:
    del raw
    width = config.prompts.max_prompt_len
    if config.prompts.source == "arithmetic":
        train_records, held_records = arithmetic.make_problems(arithmetic_task(config))
        train = encode_records(train_records, tokenizer, width, "config.arithmetic")
        held = encode_records(held_records, tokenizer, width, "config.arithmetic") if held_records else None
    else:
        records = read_records(config.prompts.path)
        if config.prompts.max_prompts:
            records = records[:config.prompts.max_prompts]
        order = np.random.default_rng(config.seed).permutation(len(records))
        n_val = round(config.prompts.val_fraction * len(records))
        train = encode_records([records[i] for i in order[n_val:]], tokenizer, width, config.prompts.path)
        held = encode_records([records[i] for i in order[:n_val]], tokenizer, width, config.prompts.path) \
            if n_val else None
    if config.reward.fn:
        available = set().union(*(r.keys() for r in train.records)) - {"prompt"}
        rf.check_reward_fields(rf.load_rewards(config.reward.fn, config.reward.weights or None), available)
    g = config.grpo.num_generations
    return Prompts(GroupBatches(train, config.batch_size // g, g, width, config.seed), held)


# ----------------------------------------------------------------------------------------------------------------------
# Compiled phases: sampling, log-probs of the behaviour policy (and reference), the optimisation steps


def make_phases(config, cfg, mesh, shardings, eos_id: int, score_fns):
    temperature = config.sampling.temperature

    def sample(params, tokens, lengths, rng, sample_temperature):
        return decode.sample(params, cfg, tokens, lengths, rng, max_gen_len=config.sampling.max_gen_len,
                             temperature=sample_temperature, top_p=config.sampling.top_p, eos_id=eos_id, mesh=mesh)

    def sample_with_slots(params, tokens, lengths, rng, sample_temperature):
        """Row r answers prompt r // G (its sample r % G) and draws with sample_keys(rng, r // G, r % G)."""
        rows = np.arange(tokens.shape[0])
        keys = slot_sampler.sample_keys(rng, rows // config.grpo.num_generations, rows % config.grpo.num_generations)
        return rollout.sample_with_slots(
            params, cfg, tokens, lengths, keys, max_gen_len=config.sampling.max_gen_len,
            n_slots=rollout.slot_count(config, tokens.shape[0]), temperature=float(sample_temperature),
            top_p=config.sampling.top_p, eos_id=eos_id, mesh=mesh)

    def experience(params, ref_params, reward_params, rolled, is_safety):
        ids, score_lens = rlhf.scoring_sequences(rolled["tokens"], rolled["prompt_lens"], rolled["lengths"], eos_id)
        mask = action_mask(rolled["tokens"], rolled["prompt_lens"], rolled["lengths"], eos_id)
        logprobs_of = functools.partial(losses.sequence_logprobs, model=Llama(cfg), temperature=temperature)
        out = {"ids": ids, "mask": mask, "logprobs": logprobs_of(params, ids)[0] * mask}
        if ref_params is not None:
            out["ref_logprobs"] = logprobs_of(ref_params, ids)[0] * mask
        scores = (rlhf.score_sequences(score_fns, reward_params, ids, score_lens, is_safety,
                                       config.reward.safety_threshold) if score_fns else {})
        return out, scores

    g = config.grpo
    if g.variant == "grpo":
        loss_fn = functools.partial(losses.grpo_loss, model=Llama(cfg), temperature=temperature, beta=g.beta,
                                    clip_low=g.clip_low, clip_high=g.clip_high, aggregation=g.aggregation,
                                    max_completion_length=config.sampling.max_gen_len)
    else:
        loss_fn = functools.partial(losses.rloo_loss, model=Llama(cfg), temperature=temperature, clip_low=g.clip_low,
                                    clip_high=g.clip_high)

    def update(state, batch, rng):
        rows = batch["mask"].shape[0]
        order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(rng, e), rows)
                                 for e in range(g.epochs)]).reshape(-1, config.minibatch_size)

        def step(state, picked):
            minibatch = {k: jax.lax.with_sharding_constraint(v[picked], sh.batch_sharding(mesh, v.ndim))
                         for k, v in batch.items()}
            state, metrics = train_state.train_step(state, minibatch, loss_fn=loss_fn,
                                                    grad_accum_steps=config.grad_accum_steps)
            return state, metrics

        state, metrics = jax.lax.scan(step, state, order)
        return state, jax.tree.map(jnp.mean, metrics)

    sample_fn = (sample_with_slots if rollout.uses_slots(config) else
                 jax.jit(sample, compiler_options=decode.DECODE_COMPILER_OPTIONS))
    experience_fn = jax.jit(sh.with_activation_sharding(experience, mesh))
    update_fn = jax.jit(sh.with_activation_sharding(update, mesh), in_shardings=(shardings, None, None),
                        out_shardings=(shardings, sh.replicated(mesh)), donate_argnums=(0,))
    return sample_fn, experience_fn, update_fn


# ----------------------------------------------------------------------------------------------------------------------
# Rewards and advantages on the host


def completions_of(tokenizer, rolled) -> list[str]:
    tokens, starts, lengths = jax.device_get((rolled["tokens"], rolled["prompt_lens"], rolled["lengths"]))
    return [tokenizer.decode([int(t) for t in row[s:s + n]]) for row, s, n in zip(tokens, starts, lengths)]


def score_completions(config, reward_fns, prompts: PromptSet, index, completions, rm_scores) -> rf.RewardResult:
    """Σ_k w_k r_k over the reward functions, plus rm_weight x the reward models' whitened logit (PPO's R̃c)."""
    index = [int(i) for i in index]
    prompt_texts = [prompts.records[i]["prompt"] for i in index]
    result = (rf.compute_rewards(reward_fns, prompt_texts, completions, prompts.fields(index)) if reward_fns else
              rf.RewardResult(np.zeros(len(index), np.float32), {}, {}))
    if rm_scores:
        combined = np.asarray(jax.device_get(rm_scores["combined"]), np.float32)
        rm = np.asarray(rlhf.whiten(rlhf.logit(combined)), np.float32)
        result.per_reward["rm"] = rm
        result.total = result.total + np.float32(config.reward.rm_weight) * rm
    return result


def advantages_of(config, rewards: np.ndarray, experience: dict) -> np.ndarray:
    g = config.grpo
    if g.variant == "grpo":
        return np.asarray(group.group_advantages(rewards, g.num_generations, g.scale_rewards))
    penalised = group.rloo_rewards(rewards, experience["logprobs"], experience.get("ref_logprobs"),
                                   experience["mask"], g.beta)
    advantages = group.leave_one_out_advantages(penalised, g.num_generations)
    return np.asarray(group.normalize_advantages(advantages) if g.normalize_advantages else advantages)


def rm_score_items(rm_scores: dict) -> list[tuple[str, np.ndarray]]:
    """The reward models' sigmoid scores before whitening, [("combined", Rc [B]), ("helpful", ..), ("safety", ..)]:
    their means are comparable across batches and checkpoints (the whitened reward has mean 0 in every batch)."""
    return [(name, np.asarray(jax.device_get(values), np.float32)) for name, values in sorted(rm_scores.items())]


def reward_metrics(result: rf.RewardResult, num_generations: int) -> dict[str, float]:
    stats = group.group_reward_stats(result.total, num_generations)
    metrics = {"reward_mean": float(stats["reward_mean"]), "reward_std": float(stats["reward_std"]),
               "zero_std_fraction": float(stats["zero_std_fraction"])}
    for name, values in result.per_reward.items():
        metrics[f"reward_{name}_mean"], metrics[f"reward_{name}_std"] = float(np.mean(values)), float(np.std(values))
    metrics["reward_failures"] = float(sum(result.failures.values()))
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# The trainer


@dataclasses.dataclass
class Policy:
    """What an iteration needs besides the state: the compiled phases, the frozen models, the reward functions."""
    phases: tuple
    reference: object  # the frozen reference's params, or None (beta = 0)
    reward_params: dict
    reward_fns: list
    tokenizer: object


def is_safety_of(prompts: PromptSet, index) -> np.ndarray:
    return np.array([bool(prompts.records[int(i)].get("is_safety", False)) for i in index])


def run_iteration(config, policy: Policy, state, batch, prompts: PromptSet, rng) -> tuple:
    """Sample, score and update once. Returns (state, host metrics)."""
    sample_fn, experience_fn, update_fn = policy.phases
    index = np.asarray(jax.device_get(batch["index"]))
    start = time.perf_counter()
    rolled = jax.block_until_ready(sample_fn(state.params, batch["tokens"], batch["lengths"],
                                             jax.random.fold_in(rng, 0), config.sampling.temperature))
    t_gen = time.perf_counter() - start
    experience, rm_scores = experience_fn(state.params, policy.reference, policy.reward_params, rolled,
                                          is_safety_of(prompts, index))
    result = score_completions(config, policy.reward_fns, prompts, index, completions_of(policy.tokenizer, rolled),
                               rm_scores)
    experience["advantages"] = jnp.asarray(advantages_of(config, result.total, experience))
    state, update_metrics = update_fn(state, experience, jax.random.fold_in(rng, 1))
    update_metrics = {k: float(v) for k, v in jax.device_get(update_metrics).items()}
    lengths, truncated = (np.asarray(x) for x in jax.device_get((rolled["lengths"], rolled["truncated"])))
    metrics = reward_metrics(result, config.grpo.num_generations)
    metrics.update({f"reward_{name}_mean": float(np.mean(values)) for name, values in rm_score_items(rm_scores)})
    if config.grpo.variant == "rloo" and "ref_logprobs" in experience:  # RLOO's KL is in the reward: k1 per answer
        kl = jnp.sum((experience["logprobs"] - experience["ref_logprobs"]) * experience["mask"], axis=1)
        metrics["kl"] = float(jnp.mean(kl))
    metrics.update(losses.per_token_means(update_metrics), loss=update_metrics["loss"],
                   grad_norm=update_metrics["grad_norm"], answer_length_mean=float(lengths.mean()),
                   answer_length_max=float(lengths.max()), truncated_fraction=float(truncated.mean()),
                   generation_tokens_per_s=float(lengths.sum()) / t_gen, generation_s=t_gen)
    return state, metrics


def evaluate(config, policy: Policy, params, prompts: PromptSet, mesh, rows: int) -> dict[str, float]:
    """Greedy answers to every held-out prompt (batches of `rows`), scored like training answers: eval_reward_*."""
    sample_fn, experience_fn, _ = policy.phases
    totals = []
    per_reward: dict[str, list] = {}
    width = config.prompts.max_prompt_len
    for begin in range(0, len(prompts.encoded), rows):
        index = np.arange(begin, min(begin + rows, len(prompts.encoded)))
        padded = np.concatenate([index, np.full(rows - len(index), index[0])])
        tokens, lengths = generate.pad_prompts([prompts.encoded[i] for i in padded], generate.META_PAD_ID, width,
                                               bucket=width)
        rolled = sample_fn(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0), 0.0)
        rm_scores = {}
        if policy.reward_params:
            _, rm_scores = experience_fn(params, policy.reference, policy.reward_params, rolled,
                                         is_safety_of(prompts, padded))
        real = len(index)  # the padding rows are not scored: they would enter the reward models' whitening
        rm_scores = {name: np.asarray(jax.device_get(values))[:real] for name, values in rm_scores.items()}
        result = score_completions(config, policy.reward_fns, prompts, index,
                                   completions_of(policy.tokenizer, rolled)[:real], rm_scores)
        totals.append(result.total)
        for name, values in list(result.per_reward.items()) + rm_score_items(rm_scores):
            per_reward.setdefault(name, []).append(values)
    out = {"eval_reward_mean": float(np.mean(np.concatenate(totals)))}
    out.update({f"eval_reward_{name}_mean": float(np.mean(np.concatenate(v))) for name, v in per_reward.items()})
    return out


def log_line(iteration: int, metrics: dict) -> str:
    shown = [("reward", "reward_mean", "{:.4f}"), ("zero-std", "zero_std_fraction", "{:.2f}"),
             ("kl", "kl", "{:.4f}"), ("clip", "clipfrac", "{:.3f}"), ("len", "answer_length_mean", "{:.1f}"),
             ("trunc", "truncated_fraction", "{:.2f}"), ("gen tok/s", "generation_tokens_per_s", "{:,.0f}"),
             ("eval reward", "eval_reward_mean", "{:.4f}"), ("eval Rc", "eval_reward_combined_mean", "{:.4f}")]
    return f"iteration {iteration}: " + " ".join(f"{label} {fmt.format(metrics[key])}" for label, key, fmt in shown
                                                 if key in metrics)


def iteration_step(run: Run, policy: Policy):
    config = run.config
    rng = jax.random.PRNGKey(config.seed)

    def step(state: train_state.LoopState, batch):
        iteration = int(jax.device_get(state.step)) + 1
        main, metrics = run_iteration(config, policy, state.main, batch, run.data.train.prompts,
                                      jax.random.fold_in(rng, iteration))
        every = config.eval_every_iterations
        if run.data.held_out is not None and every and (iteration % every == 0 or iteration == config.iterations):
            metrics.update(evaluate(config, policy, main.params, run.data.held_out, run.mesh, config.batch_size))
        metrics["policy_step"] = float(jax.device_get(main.step))
        if jax.process_index() == 0:
            print(log_line(iteration, metrics), flush=True)
        return state.replace(step=iteration, main=main), metrics

    return step


def check_model(config, cfg, mesh, *, rewards) -> None:
    if config.prompts.max_prompt_len + config.sampling.max_gen_len + 1 > cfg.max_seq_len:
        raise ConfigError(f"config.prompts.max_prompt_len + config.sampling.max_gen_len + 1 exceeds the policy's "
                          f"max_seq_len {cfg.max_seq_len}")
    dp = sh.data_parallel_size(mesh)
    if (config.minibatch_size // config.grad_accum_steps) % dp or config.batch_size % dp:
        raise ConfigError(f"config.batch_size and config.minibatch_size / grad_accum_steps must be multiples of the "
                          f"data-parallel size {dp}")
    if rewards is not None:
        rewards.check(config, cfg)


def grpo_task(rewards) -> Task:
    return Task("grpo", check=functools.partial(check_fields, reward_models_given=rewards is not None),
                check_model=functools.partial(check_model, rewards=rewards), make_data=make_data, seq_len=False,
                init_from_required=True, lora=False, eval_tasks=False)


def train(config, workdir: str, rewards=None) -> TrainResult:
    """GRPO / RLOO to config.iterations; `rewards` the reward models (RewardCheckpoints, a Rewards stand-in) or None
    (reward functions only). The history has one row per iteration."""
    run = setup(config, workdir, grpo_task(rewards))
    config, cfg, mesh = run.config, run.model_cfg, run.mesh
    reward_models = rewards.load(config, mesh, cfg) if rewards is not None else None
    keep_reference = config.grpo.beta > 0
    trainable = init_state(run, make_tx(config, learning_rate=config.learning_rate)[0], reference=keep_reference)
    reward_fns = (rf.load_rewards(config.reward.fn, config.reward.weights or None, config.reward.fallback)
                  if config.reward.fn else [])
    phases = make_phases(config, cfg, mesh, trainable.shardings, run.tokenizer.eos_id,
                         reward_models.fns if reward_models else {})
    policy = Policy(phases, trainable.frozen if keep_reference else None,
                    reward_models.params if reward_models else {}, reward_fns, run.tokenizer)
    prompts = run.data
    names = [r.spec for r in reward_fns] + (["reward models"] if reward_models else [])
    print(f"{config.grpo.variant.upper()}: {len(prompts.train.prompts.encoded)} train / "
          f"{len(prompts.held_out.encoded) if prompts.held_out else 0} held-out prompts, "
          f"{config.batch_size // config.grpo.num_generations} prompts x G={config.grpo.num_generations} per "
          f"iteration, rewards: {', '.join(names)}, reference {'kept' if keep_reference else 'not kept (beta = 0)'}")
    settings = dataclasses.replace(run.settings, num_train_steps=config.iterations, log_every_steps=1,
                                   checkpoint_every_steps=config.checkpoint_every_iterations, progress_bar=False)
    return run.run_loop(settings=settings, state=train_state.LoopState(0, trainable.state, {}),
                        shardings=train_state.LoopState(None, trainable.shardings, {}),
                        train_step=iteration_step(run, policy),
                        train_iter=ProcessRows(prompts.train, jax.process_index(), jax.process_count()))


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """GRPO with config.reward's functions and, when their paths are set, reward-model checkpoints."""
    return exit_if_interrupted(train(config, workdir, RewardCheckpoints() if uses_reward_models(config) else None))


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "GRPO config file (configs/grpo_*.py).")
