r"""PPO (paper section 3.2.3): `python -m train.ppo --config=configs/ppo_tiny.py --workdir=DIR --config.init_from=POLICY
    --config.reward.helpful_path=RM_H --config.reward.safety_path=RM_S --config.prompts.path=PROMPTS.jsonl`.

Models: the policy πθ (init_from: an RS/SFT checkpoint; AdamW, constant LR), the frozen reference π0 (a copy of the
initial policy), a value model (`score_model.ScoreModel` read at every token: trunk + scalar head; from
`value.init_from`: a reward model, as InstructGPT, or "policy" = the policy's trunk with a fresh head) with its own
AdamW, and one or two frozen reward models. Everything stays sharded on the mesh.

One iteration = three phases (llama2_jax/rlhf/rollout.py, and `ppo_update` here); only the sampled tokens (with the
slot engine) and scalars come back to the host:
  1. `rollout`: the `batch_size` prompts through decode slots (config.rollout.engine = "slots": a host loop over
     compiled slot programs, `rollout.rollout_with_slots`) or `decode.sample` inside jit ("batch"), with the policy
     params as they are on device;
  2. `make_experience`: RM scores of prompt + response (+ EOS when cut; see rlhf.scoring_sequences),
     Rc by the piecewise rule, R̃c = whiten(logit(Rc)) over the batch, log πθ, log π0, values, per-token rewards
     -β·KL + R̃c at the last token, GAE, whitened advantages (llama2_jax.rlhf.formulas documents every choice);
  3. `ppo_update`: `ppo_epochs` passes over the batch in shuffled minibatches of `minibatch_size`, one optimizer step
     of the policy (clipped surrogate) and one of the value model (clipped value loss) per minibatch, with the shared
     `llama2_jax.training.state.train_step` (gradient accumulation inside a minibatch with `grad_accum_steps`).
Tokens are the policy's actions: response tokens and the EOS when the policy produced it. Log-probabilities use
softmax(logits / temperature), the distribution sampled from (top-p is not modelled: keep top_p = 1).

The iterations run on the shared loop (`training.loop.run_loop`: one loop step = one iteration), which checkpoints
the policy and the value model as ONE step (`training.checkpointer`) and logs through the shared tracker.

Outputs: WORKDIR/metrics.jsonl + TensorBoard (one record per iteration: rewards helpful/safety/combined, KL to π0,
losses, clip fractions, entropy, response length; generation_tokens_per_s = new tokens sampled per second,
training_tokens_per_s = ppo_epochs x B x (S + 1) sequence tokens through the policy and value updates per second;
iteration 1 includes compilation), held-out rewards every `eval_every_iterations` (the paper early-stops on them: the
policy of the best held-out reward is kept in WORKDIR/best/, an init_from, and the run stops after
`early_stop_patience` evaluations without improvement; 0 = run all iterations), and WORKDIR/checkpoints/<policy
step>/params (+ llama_config.json and tokenizer.model: an init_from for the next RS/PPO round) with the value model
beside it (value_params, value_opt_state; its architecture is in WORKDIR/run.json) every
`checkpoint_every_iterations` and at the end. A re-run resumes from the latest checkpoint (π0 is re-read from
init_from). The reward models are an argument of `train` (`rlhf_setup.RewardCheckpoints()` for the command line).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama2_jax.checkpoints import params_io
from llama2_jax.checkpoints.layout import TOKENIZER_FILE
from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data.prompts import ShuffledEpochs
from llama2_jax.inference import decode, generate
from llama2_jax.model import score as score_model
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import Llama
from llama2_jax.rlhf import rollout as ppo_rollout
from llama2_jax.training import losses, run_dir
from llama2_jax.training import state as train_state
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.hosts import ProcessRows, host_to_global
from llama2_jax.training.initial_state import init_state, make_tx
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.model_config import model_config_from
from llama2_jax.training.outputs import read_json, write_json
from llama2_jax.training.rlhf_setup import RewardCheckpoints, Rewards, load_prompts, load_score_params
from llama2_jax.training.setup import Run, Task, setup


def check_config(config, mesh, cfg) -> None:
    """One-line ConfigErrors for the PPO fields, before anything is loaded or compiled."""
    dp, batch, mb = sh.data_parallel_size(mesh), config.batch_size, config.minibatch_size
    if batch < 1 or mb < 1 or batch % mb:
        raise ConfigError(f"config.batch_size ({batch}) must be a positive multiple of config.minibatch_size "
                          f"({mb})")
    if mb % config.grad_accum_steps or (mb // config.grad_accum_steps) % dp:
        raise ConfigError(f"config.minibatch_size / grad_accum_steps ({mb} / {config.grad_accum_steps}) must "
                          f"be a whole multiple of the data-parallel size {dp}")
    chunk = config.rollout_chunk_size
    if chunk and (batch % chunk or chunk % dp):
        raise ConfigError(f"config.rollout_chunk_size ({chunk}) must divide config.batch_size ({batch}) and "
                          f"be a multiple of the data-parallel size {dp} (0 = the whole batch)")
    if config.ppo_epochs < 1 or config.iterations < 1:
        raise ConfigError("config.ppo_epochs and config.iterations must be >= 1")
    if not config.sampling.temperature > 0 or not 0 < config.sampling.top_p <= 1:
        raise ConfigError(f"config.sampling: temperature ({config.sampling.temperature}) must be > 0 and "
                          f"top_p ({config.sampling.top_p}) in (0, 1]")
    if config.beta < 0 or not 0 <= config.gamma <= 1 or not 0 <= config.lam <= 1 or not config.clip_ratio > 0:
        raise ConfigError("config: beta must be >= 0, gamma and lam in [0, 1], clip_ratio > 0")
    if config.prompts.max_prompt_len + config.sampling.max_gen_len + 1 > cfg.max_seq_len:
        raise ConfigError(f"config.prompts.max_prompt_len + config.sampling.max_gen_len + 1 exceeds the "
                          f"policy's max_seq_len {cfg.max_seq_len}")
    if config.early_stop_patience < 0 or (config.early_stop_patience and not config.prompts.val_fraction > 0):
        raise ConfigError(f"config.early_stop_patience ({config.early_stop_patience}) must be >= 0 and needs "
                          "held-out prompts (config.prompts.val_fraction > 0)")
    value_init_path(config)  # raises for a value.init_from naming an empty reward path
    ppo_rollout.check_engine(config)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt batches


class PromptBatches:
    """Endless shuffled epochs over the prompts; `next()` -> {"tokens" [B, P] right-padded with -1, "lengths" [B],
    "is_safety" [B]} as host arrays, identical on every process. `get_state` / `set_state` for resuming."""

    def __init__(self, encoded, prompts, batch_size: int, width: int, seed: int):
        self.encoded, self.flags, self.batch_size, self.width = encoded, prompts, batch_size, width
        self.order = ShuffledEpochs(len(encoded), seed)

    def __next__(self) -> dict[str, np.ndarray]:
        picked = self.order.take(self.batch_size)
        tokens, lengths = generate.pad_prompts([self.encoded[i] for i in picked], generate.META_PAD_ID, self.width,
                                               bucket=self.width)
        return {"tokens": tokens, "lengths": lengths, "is_safety": np.array([self.flags[i].is_safety for i in picked])}

    next = __next__

    def get_state(self) -> dict:
        return self.order.get_state()

    def set_state(self, state: dict) -> None:
        self.order.set_state(state)


def split_prompts(prompts, encoded, val_fraction: float, seed: int):
    """[(train prompts, their tokens), (held-out prompts, their tokens)]: a fixed random split."""
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_val = int(round(val_fraction * len(prompts)))
    if n_val >= len(prompts):
        raise ConfigError(f"config.prompts.val_fraction={val_fraction} leaves none of {len(prompts)} prompts")
    return [([prompts[i] for i in part], [encoded[i] for i in part]) for part in (order[n_val:], order[:n_val])]


# ----------------------------------------------------------------------------------------------------------------------
# Set-up: models and optimizer states


VALUE_FROM_RM = {"helpful_rm": "helpful_path", "safety_rm": "safety_path"}
VALUE = "value"  # the value model's name in the workdir's checkpoints (value_params, value_opt_state) and run.json


def value_init_path(config) -> str:
    """The reward-model workdir the value model starts from ("" = from the policy): config.value.init_from is
    "helpful_rm" | "safety_rm" (that RM's path) | "policy" | a path."""
    source = config.value.init_from
    if source == "policy":
        return ""
    if source in VALUE_FROM_RM:
        path = config.reward[VALUE_FROM_RM[source]]
        if not path:
            raise ConfigError(f"config.value.init_from={source!r} but config.reward.{VALUE_FROM_RM[source]} is "
                              "empty (use 'policy' or a reward-model path)")
        return path
    if not source:
        raise ConfigError("config.value.init_from is empty: use helpful_rm, safety_rm, policy or a path")
    return source


def value_model_config(config, cfg):
    """The value model's architecture: that of its reward-model workdir (numerics of the policy's `cfg`), or the
    policy's."""
    path = value_init_path(config)
    return model_config_from(path, cfg, f"config.value.init_from ({path})") if path else cfg


def init_value(config, value_cfg, policy_params, mesh):
    """(value TrainState, its shardings) from a reward-model workdir or from the policy's trunk + a fresh head; AdamW
    at the constant config.value.learning_rate."""
    tx, _ = make_tx(config, learning_rate=config.value.learning_rate)
    shardings = train_state.state_shardings(score_model.abstract_score_params(value_cfg, boxed=True), tx, mesh)
    path = value_init_path(config)
    if path:
        params = load_score_params(path, value_cfg, shardings.params, f"config.value.init_from ({path})")
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
    if ppo_rollout.uses_slots(config):  # a host loop over compiled slot programs (config.rollout)
        generate_fn = bind(ppo_rollout.rollout_with_slots, cfg=cfg, settings=settings, mesh=mesh,
                           n_slots=ppo_rollout.slot_count(config, config.batch_size))
    else:
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
        params_io.save_params(staging, params, cfg)
        if jax.process_index() == 0:
            shutil.copy(os.path.join(self.workdir, TOKENIZER_FILE), staging)
            write_json(os.path.join(staging, "best.json"), info)
            if os.path.isdir(self.dir):
                shutil.rmtree(self.dir)
            os.replace(staging, self.dir)


# ----------------------------------------------------------------------------------------------------------------------
# The trainer


def timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def run_iteration(phases, states, models, batch, rng, epochs: int) -> tuple:
    """Generate, score and update once on a global prompt batch. Returns (policy state, value state, host
    metrics)."""
    generate_fn, experience_fn, update_fn = phases
    policy_state, value_state = states
    rolled, t_gen = timed(generate_fn, policy_state.params, batch["tokens"], batch["lengths"],
                          jax.random.fold_in(rng, 0))
    (experience, exp_metrics), t_exp = timed(experience_fn, policy_state.params, models["reference"],
                                             value_state.params, models["reward"], rolled, batch["is_safety"])
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
    batch = {name: host_to_global(value, mesh) for name, value in batches.next().items()}
    rolled = generate_fn(states[0].params, batch["tokens"], batch["lengths"], rng)
    _, metrics = experience_fn(states[0].params, models["reference"], states[1].params, models["reward"], rolled,
                               batch["is_safety"])
    shown = ("reward_helpful", "reward_safety", "reward_combined", "kl", "response_length")
    return {f"eval_{k}": float(v) for k, v in jax.device_get(metrics).items() if k in shown}


def log_line(iteration: int, metrics: dict) -> str:
    shown = [("reward", "reward_combined", "{:.4f}"), ("kl", "kl", "{:.4f}"), ("len", "response_length", "{:.1f}"),
             ("pg", "policy_loss", "{:.4f}"), ("vf", "value_loss", "{:.4f}"), ("clip", "policy_clipfrac", "{:.3f}"),
             ("ent", "entropy", "{:.3f}"), ("gen tok/s", "generation_tokens_per_s", "{:,.0f}"),
             ("train tok/s", "training_tokens_per_s", "{:,.0f}"), ("eval reward", "eval_reward_combined", "{:.4f}")]
    return f"iteration {iteration}: " + " ".join(f"{label} {fmt.format(metrics[key])}" for label, key, fmt in shown
                                                 if key in metrics)


@dataclasses.dataclass
class Prompts:
    train: PromptBatches
    held_out: PromptBatches | None  # None without config.prompts.val_fraction


def make_prompts(config, tokenizer, raw=None) -> Prompts:
    del raw
    prompts, encoded = load_prompts(config, tokenizer)
    (train_p, train_e), (val_p, val_e) = split_prompts(prompts, encoded, config.prompts.val_fraction, config.seed)
    width, batch = config.prompts.max_prompt_len, config.batch_size
    return Prompts(PromptBatches(train_e, train_p, batch, width, config.seed),
                   PromptBatches(val_e, val_p, batch, width, config.seed) if val_e else None)


def check_model(config, cfg, mesh, *, rewards) -> dict:
    """The checks that need the policy and the mesh; returns the value model a resumed run must match."""
    check_config(config, mesh, cfg)
    value_cfg = value_model_config(config, cfg)
    if value_init_path(config):
        run_dir.check_init_params(value_init_path(config), value_cfg, kind="score", field="config.value.init_from")
    rewards.check(config, cfg)
    return {VALUE: value_cfg.to_dict()}


def ppo_task(rewards) -> Task:
    return Task("ppo", check_model=functools.partial(check_model, rewards=rewards), make_data=make_prompts,
                seq_len=False, init_from_required=True, lora=False, eval_tasks=False)


def iteration_step(run: Run, phases, models: dict, stopped: dict):
    """The loop's step: one PPO iteration (and the held-out evaluation on its cadence) on a LoopState of the
    policy (main) and the value model."""
    config, rng, held_out = run.config, jax.random.PRNGKey(run.config.seed), run.data.held_out
    best = None

    def step(state: train_state.LoopState, batch):
        nonlocal best
        iteration = int(jax.device_get(state.step)) + 1
        if best is None:  # the first iteration of this run: the loop has restored the resumed one
            best = BestPolicy(run.workdir, config.early_stop_patience, resumed_at=iteration - 1)
        step_rng = jax.random.fold_in(rng, iteration)
        states = (state.main, state.others[VALUE])
        policy, value, metrics = run_iteration(phases, states, models, batch, step_rng, config.ppo_epochs)
        if held_out is not None and iteration % config.eval_every_iterations == 0:
            metrics.update(evaluate(phases, (policy, value), models, held_out, jax.random.fold_in(step_rng, 2),
                                    run.mesh))
            stopped.update(best.update(iteration, metrics["eval_reward_combined"], policy.params, run.model_cfg))
        metrics["policy_step"] = float(jax.device_get(policy.step))
        if jax.process_index() == 0:
            print(log_line(iteration, metrics), flush=True)
            if stopped["stop"]:
                print(f"early stop: no held-out improvement for {config.early_stop_patience} evaluations; best "
                      f"policy (iteration {stopped['best_iteration']}) in {best.dir}", flush=True)
        return state.replace(step=iteration, main=policy, others={VALUE: value}), metrics

    return step


def train(config, workdir: str, rewards: RewardCheckpoints | Rewards) -> TrainResult:
    """Run PPO to config.iterations with these reward models; the history has one row per iteration."""
    run = setup(config, workdir, ppo_task(rewards))
    config, cfg, mesh = run.config, run.model_cfg, run.mesh
    reward_models = rewards.load(config, mesh, cfg)
    value_cfg = value_model_config(config, cfg)
    policy = init_state(run, make_tx(config, learning_rate=config.learning_rate)[0], reference=True)
    value_state, value_shardings = init_value(config, value_cfg, policy.state.params, mesh)
    phases = compile_phases(config, cfg, value_cfg, reward_models.fns, settings_from(config, run.tokenizer.eos_id),
                            mesh, policy.shardings, value_shardings)
    prompts = run.data
    print(f"PPO: {len(prompts.train.encoded)} train / {len(prompts.held_out.encoded) if prompts.held_out else 0} "
          f"held-out prompts, batch {config.batch_size}, minibatch {config.minibatch_size}, reward models: "
          f"{', '.join(reward_models.fns)}, value model from {value_init_path(config) or 'the policy'}")
    stopped = {"stop": False}
    models = {"reference": policy.frozen, "reward": reward_models.params}
    settings = dataclasses.replace(run.settings, num_train_steps=config.iterations, log_every_steps=1,
                                   checkpoint_every_steps=config.checkpoint_every_iterations, progress_bar=False)
    # profile_steps counts iterations (1-based) here
    return run.run_loop(
        settings=settings, state=train_state.LoopState(0, policy.state, {VALUE: value_state}),
        shardings=train_state.LoopState(None, policy.shardings, {VALUE: value_shardings}),
        train_step=iteration_step(run, phases, models, stopped),
        train_iter=ProcessRows(prompts.train, jax.process_index(), jax.process_count()),
        stop_early=lambda: stopped["stop"])


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """PPO with the reward models of config.reward's checkpoints."""
    return exit_if_interrupted(train(config, workdir, RewardCheckpoints()))


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "PPO config file (configs/ppo_*.py).")
