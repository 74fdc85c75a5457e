r"""PPO (paper section 3.2.3): `python -m train.ppo --config=configs/ppo_tiny.py --workdir=DIR --config.init_from=POLICY
    --config.reward.helpful_path=RM_H --config.reward.safety_path=RM_S --config.prompts.path=PROMPTS.jsonl`.

Models: the policy πθ (init_from: an RS/SFT checkpoint; AdamW, constant LR), the frozen reference π0 (a copy of the
initial policy), a value model (`score_model.ScoreModel` read at every token: trunk + scalar head; from
`value.init_from`: a reward model, as InstructGPT, or "policy" = the policy's trunk with a fresh head) with its own
AdamW, and one or two frozen reward models. Everything stays sharded on the mesh.

One iteration = three compiled calls (llama2_jax/rlhf/rollout.py, and `ppo_update` here), no host round-trip of model outputs between them (only
scalars come back):
  1. `rollout`: `decode.sample` inside jit on `batch_size` prompts (policy params as they are on device);
  2. `make_experience`: RM scores of prompt + response (+ EOS when cut; see rlhf.scoring_sequences),
     Rc by the piecewise rule, R̃c = whiten(logit(Rc)) over the batch, log πθ, log π0, values, per-token rewards
     -β·KL + R̃c at the last token, GAE, whitened advantages (llama2_jax.rlhf.formulas documents every choice);
  3. `ppo_update`: `ppo_epochs` passes over the batch in shuffled minibatches of `minibatch_size`, one optimizer step
     of the policy (clipped surrogate) and one of the value model (clipped value loss) per minibatch, with the shared
     `llama2_jax.training.state.train_step` (gradient accumulation inside a minibatch with `grad_accum_steps`).
Tokens are the policy's actions: response tokens and the EOS when the policy produced it. Log-probabilities use
softmax(logits / temperature), the distribution sampled from (top-p is not modelled: keep top_p = 1).

Outputs: WORKDIR/metrics.jsonl + TensorBoard (one record per iteration: rewards helpful/safety/combined, KL to π0,
losses, clip fractions, entropy, response length; generation_tokens_per_s = new tokens sampled per second,
training_tokens_per_s = ppo_epochs x B x (S + 1) sequence tokens through the policy and value updates per second;
iteration 1 includes compilation), held-out rewards every `eval_every_iterations` (the paper early-stops on them: the
policy of the best held-out reward is kept in WORKDIR/best/, an init_from, and the run stops after
`early_stop_patience` evaluations without improvement; 0 = run all iterations), and WORKDIR/checkpoints/<policy
step>/params (+ llama_config.json and tokenizer.model: an init_from for the next RS/PPO round) every
`checkpoint_every_iterations` and at the end; the value model in WORKDIR/value/. A re-run resumes from the latest
checkpoint (π0 is re-read from init_from).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.checkpoints import params_io as param_checkpoint
from llama2_jax.cli import trainer as trainer_main
from llama2_jax.inference import decode, generate
from llama2_jax.model import score as score_model
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import Llama
from llama2_jax.rlhf import rollout as ppo_rollout
from llama2_jax.training import common, loop, losses
from llama2_jax.training import state as train_state
from llama2_jax.training.checkpointer import CheckpointError, TrainCheckpointer, UnreadableCheckpoint


def check_config(config, mesh, cfg) -> None:
    """One-line ConfigErrors for the PPO fields, before anything is loaded or compiled."""
    dp, batch, mb = sh.data_parallel_size(mesh), config.batch_size, config.minibatch_size
    if batch < 1 or mb < 1 or batch % mb:
        raise common.ConfigError(f"config.batch_size ({batch}) must be a positive multiple of config.minibatch_size "
                                 f"({mb})")
    if mb % config.grad_accum_steps or (mb // config.grad_accum_steps) % dp:
        raise common.ConfigError(f"config.minibatch_size / grad_accum_steps ({mb} / {config.grad_accum_steps}) must "
                                 f"be a whole multiple of the data-parallel size {dp}")
    chunk = config.rollout_chunk_size
    if chunk and (batch % chunk or chunk % dp):
        raise common.ConfigError(f"config.rollout_chunk_size ({chunk}) must divide config.batch_size ({batch}) and "
                                 f"be a multiple of the data-parallel size {dp} (0 = the whole batch)")
    if config.ppo_epochs < 1 or config.iterations < 1:
        raise common.ConfigError("config.ppo_epochs and config.iterations must be >= 1")
    if not config.sampling.temperature > 0 or not 0 < config.sampling.top_p <= 1:
        raise common.ConfigError(f"config.sampling: temperature ({config.sampling.temperature}) must be > 0 and "
                                 f"top_p ({config.sampling.top_p}) in (0, 1]")
    if config.beta < 0 or not 0 <= config.gamma <= 1 or not 0 <= config.lam <= 1 or not config.clip_ratio > 0:
        raise common.ConfigError("config: beta must be >= 0, gamma and lam in [0, 1], clip_ratio > 0")
    if config.prompts.max_prompt_len + config.sampling.max_gen_len + 1 > cfg.max_seq_len:
        raise common.ConfigError(f"config.prompts.max_prompt_len + config.sampling.max_gen_len + 1 exceeds the "
                                 f"policy's max_seq_len {cfg.max_seq_len}")
    if config.early_stop_patience < 0 or (config.early_stop_patience and not config.prompts.val_fraction > 0):
        raise common.ConfigError(f"config.early_stop_patience ({config.early_stop_patience}) must be >= 0 and needs "
                                 "held-out prompts (config.prompts.val_fraction > 0)")
    value_init_path(config)  # raises for a value.init_from naming an empty reward path


# ----------------------------------------------------------------------------------------------------------------------
# Prompt batches


class PromptBatches:
    """Endless shuffled epochs over the prompts; `next()` -> (tokens [B, P] right-padded with -1, lengths [B],
    is_safety [B]) as host arrays, identical on every process. `state` / `restore` for resuming."""

    def __init__(self, encoded, prompts, batch_size: int, width: int, seed: int):
        self.encoded, self.flags, self.batch_size, self.width, self.seed = encoded, prompts, batch_size, width, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.encoded))

    def next(self):
        picked, order = [], self._order()
        while len(picked) < self.batch_size:
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            picked.append(int(order[self.position]))
            self.position += 1
        tokens, lengths = generate.pad_prompts([self.encoded[i] for i in picked], generate.META_PAD_ID, self.width,
                                               bucket=self.width)
        return tokens, lengths, np.array([self.flags[i].is_safety for i in picked])

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def split_prompts(prompts, encoded, val_fraction: float, seed: int):
    """[(train prompts, their tokens), (held-out prompts, their tokens)]: a fixed random split."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_val = int(round(val_fraction * len(prompts)))
    if n_val >= len(prompts):
        raise common.ConfigError(f"config.prompts.val_fraction={val_fraction} leaves none of {len(prompts)} prompts")
    return [([prompts[i] for i in part], [encoded[i] for i in part]) for part in (order[n_val:], order[:n_val])]


# ----------------------------------------------------------------------------------------------------------------------
# Set-up: models and optimizer states


def make_tx(config, learning_rate: float):
    """AdamW with the paper's PPO settings (betas, eps, weight decay, clipping from config), constant LR."""
    return train_state.make_optimizer(learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                                      weight_decay=config.weight_decay, grad_clip=config.grad_clip)


def init_policy(config, cfg, mesh):
    """(policy TrainState, its shardings, π0 params): π0 is a separate copy of the initial params (the policy's
    buffers are donated to every update)."""
    state, shardings = common.init_llama_state(config, cfg, mesh, make_tx(config, config.learning_rate))
    reference = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(state.params)
    return state, shardings, reference


VALUE_FROM_RM = {"helpful_rm": "helpful_path", "safety_rm": "safety_path"}
VALUE_DIR = "value"  # WORKDIR/value: the value model's llama_config.json and checkpoints


def value_init_path(config) -> str:
    """The reward-model workdir the value model starts from ("" = from the policy): config.value.init_from is
    "helpful_rm" | "safety_rm" (that RM's path) | "policy" | a path."""
    source = config.value.init_from
    if source == "policy":
        return ""
    if source in VALUE_FROM_RM:
        path = config.reward[VALUE_FROM_RM[source]]
        if not path:
            raise common.ConfigError(f"config.value.init_from={source!r} but config.reward.{VALUE_FROM_RM[source]} is "
                                     "empty (use 'policy' or a reward-model path)")
        return path
    if not source:
        raise common.ConfigError("config.value.init_from is empty: use helpful_rm, safety_rm, policy or a path")
    return source


def value_model_config(config, cfg):
    """The value model's architecture: that of its reward-model workdir (numerics of the policy's `cfg`), or the
    policy's."""
    path = value_init_path(config)
    return common.model_config_from(path, cfg, f"config.value.init_from ({path})") if path else cfg


def init_value(config, value_cfg, policy_params, mesh):
    """(value TrainState, its shardings) from a reward-model workdir or from the policy's trunk + a fresh head."""
    tx = make_tx(config, config.value.learning_rate)
    shardings = train_state.state_shardings(score_model.abstract_score_params(value_cfg, boxed=True), tx, mesh)
    path = value_init_path(config)
    if path:
        params = common.load_score_params(path, value_cfg, shardings.params, f"config.value.init_from ({path})")
    else:
        params = score_model.init_score_params_from_llama(policy_params, jax.random.PRNGKey(config.seed + 1),
                                                          config.value.head_init_std)
    return train_state.state_from_params(params, tx, shardings), shardings


def settings_from(config, eos_id: int) -> ppo_rollout.Settings:
    same_name = ("beta", "gamma", "lam", "clip_ratio", "clip_value", "whiten_advantages", "minibatch_size",
                 "ppo_epochs", "grad_accum_steps")
    s = config.sampling
    return ppo_rollout.Settings(max_gen_len=s.max_gen_len, temperature=s.temperature, top_p=s.top_p, eos_id=eos_id,
                                safety_threshold=config.reward.safety_threshold, chunk_rows=config.rollout_chunk_size,
                                **{name: config[name] for name in same_name})


def ppo_update(policy_state, value_state, experience: dict, rng, *, cfg, value_cfg, settings: ppo_rollout.Settings,
               mesh):
    """ppo_epochs passes of shuffled minibatches, one policy step and one value step per minibatch (a lax.scan).
    Returns (policy state, value state, metrics averaged over the steps)."""
    batch = experience["mask"].shape[0]
    per_epoch = batch // settings.minibatch_size
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(rng, e), batch)
                             for e in range(settings.ppo_epochs)]).reshape(-1, settings.minibatch_size)
    p_loss = functools.partial(losses.ppo_policy_loss, model=Llama(cfg), temperature=settings.temperature,
                               clip_ratio=settings.clip_ratio)
    v_loss = functools.partial(losses.ppo_value_loss, model=score_model.ScoreModel(value_cfg),
                               clip_value=settings.clip_value)

    def step(states, rows):
        minibatch = {k: jax.lax.with_sharding_constraint(v[rows], sh.batch_sharding(mesh, v.ndim))
                     for k, v in experience.items()}
        policy, p_metrics = train_state.train_step(states[0], minibatch, loss_fn=p_loss,
                                                   grad_accum_steps=settings.grad_accum_steps)
        value, v_metrics = train_state.train_step(states[1], minibatch, loss_fn=v_loss,
                                                  grad_accum_steps=settings.grad_accum_steps)
        metrics = {**{f"policy_{k}": v for k, v in p_metrics.items() if k != "weight"},
                   **{f"value_{k}": v for k, v in v_metrics.items() if k != "weight"}}
        return (policy, value), metrics

    (policy_state, value_state), metrics = jax.lax.scan(step, (policy_state, value_state), order)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["minibatch_steps"] = jnp.asarray(per_epoch * settings.ppo_epochs, jnp.float32)
    return policy_state, value_state, metrics


def compile_phases(config, cfg, value_cfg, score_fns, settings: ppo_rollout.Settings, mesh, shardings,
                   value_shardings):
    """The three phases bound to their static arguments and jitted once (states donated to the update). Experience
    and update trace with the model's activations pinned to the rules table; the sampler shards its own buffers."""
    bind = functools.partial
    generate_fn = jax.jit(bind(ppo_rollout.rollout, cfg=cfg, settings=settings, mesh=mesh),
                          compiler_options=decode.DECODE_COMPILER_OPTIONS)
    experience = bind(ppo_rollout.make_experience, cfg=cfg, value_cfg=value_cfg, score_fns=score_fns,
                      settings=settings)
    experience_fn = jax.jit(sh.with_activation_sharding(experience, mesh))
    update = bind(ppo_update, cfg=cfg, value_cfg=value_cfg, settings=settings, mesh=mesh)
    update_fn = jax.jit(sh.with_activation_sharding(update, mesh),
                        in_shardings=(shardings, value_shardings, None, None),
                        out_shardings=(shardings, value_shardings, sh.replicated(mesh)), donate_argnums=(0, 1))
    return generate_fn, experience_fn, update_fn


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


class Checkpoints:
    """Policy state in WORKDIR/checkpoints (llama workdir layout: an init_from), value state in WORKDIR/value; the
    iteration and the prompt order are saved with the policy."""

    def __init__(self, config, workdir: str):
        options = dict(max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
        self.policy = TrainCheckpointer(workdir, **options)
        self.value = TrainCheckpointer(os.path.join(workdir, VALUE_DIR), **options)

    def save(self, policy_state, value_state, iteration: int, prompts: PromptBatches) -> None:
        extra = {"iteration": iteration, "prompts": prompts.state()}
        self.policy.save(policy_state, extra, force=True)
        self.value.save(value_state, extra, force=True)

    def restore(self, policy, value, prompts: PromptBatches) -> tuple:
        """(policy state, value state, next iteration) from the newest step that both models hold and that reads,
        or the inputs and 0. A step only one model holds (a kill between the two saves) or that does not read is
        set aside with a warning (TrainCheckpointer.set_aside)."""
        policy_steps, value_steps = set(self.policy.all_steps()), set(self.value.all_steps())
        both = sorted(policy_steps & value_steps)
        for checkpointer, steps, model in ((self.policy, policy_steps, "policy"), (self.value, value_steps, "value")):
            for step in sorted(steps - set(both)):
                if not both or step > both[-1]:
                    checkpointer.set_aside(step, f"PPO {model} checkpoint step {step} has no counterpart of the "
                                                 "other model (the run stopped between the two saves)")
        for step in reversed(both):
            try:
                policy_state, extra = self.policy.restore_step(policy[0], policy[1], step)
                value_state, _ = self.value.restore_step(value[0], value[1], step)
            except UnreadableCheckpoint as error:
                logging.warning("%s; trying an older step", error)
                continue
            for newer in (s for s in both if s > step):
                self.policy.set_aside(newer, f"PPO checkpoint step {newer} does not read")
                self.value.set_aside(newer, f"PPO checkpoint step {newer} does not read")
            prompts.restore(extra["prompts"])
            print(f"resumed from iteration {extra['iteration']} (policy step {step})")
            return policy_state, value_state, extra["iteration"]
        if both:
            raise CheckpointError(f"no PPO checkpoint step in {self.policy.directory} reads (newest {both[-1]})")
        return policy[0], value[0], 0

    def close(self) -> None:
        self.policy.close()
        self.value.close()


# ----------------------------------------------------------------------------------------------------------------------
# Early stopping on the held-out reward and the best policy (paper: PPO is early-stopped on held-out prompts)


def early_stop(evals: list[tuple[int, float]], patience: int) -> dict:
    """From the held-out evaluations so far [(iteration, eval_reward_combined)]: the best iteration and reward, the
    evaluations since it (none improved strictly), and whether to stop (patience > 0 evaluations without
    improvement; patience 0 = never)."""
    best_index = max(range(len(evals)), key=lambda i: (evals[i][1], -i)) if evals else -1
    since = len(evals) - 1 - best_index if evals else 0
    return {"best_iteration": evals[best_index][0] if evals else None,
            "best_reward": evals[best_index][1] if evals else None,
            "evals_since_best": since, "stop": patience > 0 and since >= patience}


class BestPolicy:
    """WORKDIR/best/: the policy of the best held-out reward (llama workdir layout + best.json: an init_from), and
    WORKDIR/early_stop.json: the evaluations so far (re-read on resume, cut at the resumed iteration)."""

    def __init__(self, workdir: str, patience: int, resumed_at: int):
        self.workdir, self.patience = workdir, patience
        self.dir, self.log = os.path.join(workdir, "best"), os.path.join(workdir, "early_stop.json")
        self.evals = [tuple(e) for e in read_json(self.log, {"evals": []})["evals"] if e[0] <= resumed_at]
        self.best_reward = read_json(os.path.join(self.dir, "best.json"), {}).get("eval_reward_combined")

    def update(self, iteration: int, reward: float, params, cfg) -> dict:
        """Record one evaluation; save the policy when it beats every earlier one. Returns `early_stop`'s dict."""
        self.evals.append((iteration, reward))
        if self.best_reward is None or reward > self.best_reward:
            self.save(params, cfg, {"iteration": iteration, "eval_reward_combined": reward})
            self.best_reward = reward
        write_json(self.log, {"evals": self.evals})
        return early_stop(self.evals, self.patience)

    def save(self, params, cfg, info: dict) -> None:
        """Written beside WORKDIR/best and swapped in: a kill leaves the previous best or the new one."""
        staging = self.dir + ".new"
        if jax.process_index() == 0 and os.path.isdir(staging):
            shutil.rmtree(staging)
        param_checkpoint.save_params(staging, params, cfg)
        if jax.process_index() == 0:
            shutil.copy(os.path.join(self.workdir, "tokenizer.model"), staging)
            write_json(os.path.join(staging, "best.json"), info)
            if os.path.isdir(self.dir):
                shutil.rmtree(self.dir)
            os.replace(staging, self.dir)


def read_json(path: str, default):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value) -> None:
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(value, f, indent=2)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------------------------
# The trainer


def timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def run_iteration(phases, states, models, batch, rng, mesh, epochs: int) -> tuple:
    """Generate, score and update once. Returns (policy state, value state, host metrics)."""
    generate_fn, experience_fn, update_fn = phases
    policy_state, value_state = states
    tokens, lengths, is_safety = (common.host_to_global(x, mesh) for x in batch)
    rolled, t_gen = timed(generate_fn, policy_state.params, tokens, lengths, jax.random.fold_in(rng, 0))
    (experience, exp_metrics), t_exp = timed(experience_fn, policy_state.params, models["reference"],
                                             value_state.params, models["reward"], rolled, is_safety)
    sequence_tokens = experience["ids"].size
    (policy_state, value_state, upd_metrics), t_upd = timed(update_fn, policy_state, value_state, experience,
                                                            jax.random.fold_in(rng, 1))
    metrics = {k: float(v) for k, v in jax.device_get({**exp_metrics, **upd_metrics}).items()}
    metrics.update(generation_tokens_per_s=metrics["generated_tokens"] / t_gen,
                   experience_tokens_per_s=sequence_tokens / t_exp,
                   training_tokens_per_s=epochs * sequence_tokens / t_upd,
                   generation_s=t_gen, experience_s=t_exp, training_s=t_upd)
    return policy_state, value_state, metrics


def evaluate(phases, states, models, batches: PromptBatches, rng, mesh) -> dict:
    """Held-out prompts: generate and score with the current policy, no update. eval_* metrics."""
    generate_fn, experience_fn, _ = phases
    tokens, lengths, is_safety = (common.host_to_global(x, mesh) for x in batches.next())
    rolled = generate_fn(states[0].params, tokens, lengths, rng)
    _, metrics = experience_fn(states[0].params, models["reference"], states[1].params, models["reward"], rolled,
                               is_safety)
    shown = ("reward_helpful", "reward_safety", "reward_combined", "kl", "response_length")
    return {f"eval_{k}": float(v) for k, v in jax.device_get(metrics).items() if k in shown}


def log_line(iteration: int, metrics: dict) -> str:
    shown = [("reward", "reward_combined", "{:.4f}"), ("kl", "kl", "{:.4f}"), ("len", "response_length", "{:.1f}"),
             ("pg", "policy_loss", "{:.4f}"), ("vf", "value_loss", "{:.4f}"), ("clip", "policy_clipfrac", "{:.3f}"),
             ("ent", "entropy", "{:.3f}"), ("gen tok/s", "generation_tokens_per_s", "{:,.0f}"),
             ("train tok/s", "training_tokens_per_s", "{:,.0f}"), ("eval reward", "eval_reward_combined", "{:.4f}")]
    return f"iteration {iteration}: " + " ".join(f"{label} {fmt.format(metrics[key])}" for label, key, fmt in shown
                                                 if key in metrics)


def train_and_evaluate(config, workdir: str, score_fns=None, reward_params=None) -> list[dict]:
    """Run PPO to config.iterations; returns the per-iteration records (also in WORKDIR/metrics.jsonl).

    score_fns / reward_params: stand-in reward models ({"helpful"/"safety": fn(params, tokens, lengths) -> sigmoid
    scores}) instead of config.reward's checkpoints (tests)."""
    common.check_shared_fields(config)  # before the trainer's own fields
    mesh = common.make_mesh(config)
    cfg = common.resolve_model_config(config, required=True)
    check_config(config, mesh, cfg)
    loop.LoopSettings.from_config(config)  # profile_steps and wandb checked before anything is read or compiled
    value_cfg = value_model_config(config, cfg)
    common.check_workdir(os.path.join(workdir, VALUE_DIR), value_cfg, init_from=value_init_path(config), kind="score",
                         field="config.value.init_from")
    tokenizer = common.prepare_workdir(config, workdir, cfg)
    common.write_workdir_files(os.path.join(workdir, VALUE_DIR), value_cfg)
    prompts, encoded = common.load_prompts(config, tokenizer)
    (train_p, train_e), (val_p, val_e) = split_prompts(prompts, encoded, config.prompts.val_fraction, config.seed)
    if score_fns is None:
        score_fns, reward_params = common.load_reward_models(config, mesh, cfg.vocab_size)
    settings = settings_from(config, tokenizer.eos_id)
    policy_state, shardings, reference = init_policy(config, cfg, mesh)
    value_state, value_shardings = init_value(config, value_cfg, policy_state.params, mesh)
    phases = compile_phases(config, cfg, value_cfg, score_fns, settings, mesh, shardings, value_shardings)
    width = config.prompts.max_prompt_len
    batches = PromptBatches(train_e, train_p, config.batch_size, width, config.seed)
    val_batches = PromptBatches(val_e, val_p, config.batch_size, width, config.seed) if val_e else None
    checkpoints = Checkpoints(config, workdir)
    policy_state, value_state, start = checkpoints.restore((policy_state, shardings), (value_state, value_shardings),
                                                           batches)
    models = {"reference": reference, "reward": reward_params}
    print(f"PPO: {len(train_p)} train / {len(val_p)} held-out prompts, batch {config.batch_size}, minibatch "
          f"{config.minibatch_size}, reward models: {', '.join(score_fns)}, value model from "
          f"{value_init_path(config) or 'the policy'}")

    loop.drop_metrics_after(workdir, start)  # iterations past the restored checkpoint are run (and logged) again
    writer, history, rng = loop.Tracker.from_config(config, workdir), [], jax.random.PRNGKey(config.seed)
    profiler = loop.Profiler.from_config(config, workdir)  # profile_steps counts iterations (1-based) here
    best = BestPolicy(workdir, config.early_stop_patience, start)
    stop = False
    with loop.TerminationFlag() as termination:
        for iteration in range(start + 1, config.iterations + 1):
            step_rng = jax.random.fold_in(rng, iteration)
            profiler.before_step(iteration)
            policy_state, value_state, metrics = run_iteration(phases, (policy_state, value_state), models,
                                                               batches.next(), step_rng, mesh, config.ppo_epochs)
            profiler.after_step(iteration, (policy_state, value_state))
            if val_batches is not None and iteration % config.eval_every_iterations == 0:
                metrics.update(evaluate(phases, (policy_state, value_state), models, val_batches,
                                        jax.random.fold_in(step_rng, 2), mesh))
                stop = best.update(iteration, metrics["eval_reward_combined"], policy_state.params, cfg)["stop"]
            metrics["policy_step"] = float(jax.device_get(policy_state.step))
            writer.write(iteration, metrics)
            history.append({"iteration": iteration, **metrics})
            if jax.process_index() == 0:
                print(log_line(iteration, metrics), flush=True)
            last = iteration == config.iterations or stop
            if iteration % config.checkpoint_every_iterations == 0 or last or termination.requested:
                checkpoints.save(policy_state, value_state, iteration, batches)
            if termination.requested:  # saved above; the next run resumes at iteration + 1
                break
            if stop:
                print(f"early stop: no held-out improvement for {config.early_stop_patience} evaluations; best policy "
                      f"(iteration {early_stop(best.evals, 0)['best_iteration']}) in {best.dir}", flush=True)
                break
    profiler.stop()
    checkpoints.close()
    writer.close()
    return history


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "PPO config file (configs/ppo_*.py).")
