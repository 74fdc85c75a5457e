r"""Rejection-sampling fine-tuning (paper section 3.2.3): `python -m train.rejection_sampling
    --config=configs/rs_tiny.py --workdir=DIR --config.init_from=POLICY --config.reward.helpful_path=RM
    [--config.reward.safety_path=RM] --config.prompts.path=PROMPTS.jsonl`.

Per iteration i = 0 .. iterations - 1:
  1. sample K = `sampling.num_samples` responses per prompt from the current policy (`init_from` for i = 0, then the
     previous iteration's SFT workdir) at `sampling.temperature`, or at `sampling.temperature_schedule[i]` when a
     schedule is given (the paper re-tunes T each iteration; paper: best at T = 1.2-1.3 for 10-100 samples), with
     decode slots (config.rollout.engine = "slots": every row of the iteration through `rollout.slot_count` slots,
     then the reward models in compiled calls) or the compiled fixed-batch sampler on the mesh ("batch":
     `decode.sample` inside one jit with the reward models);
  2. score prompt + response (+ EOS, appended to responses cut at max_gen_len: the RMs read their score at the EOS
     that ends an answer; such answers are marked truncated, `decode.truncated_rows`) with the reward model(s): with
     both RMs, the piecewise rule of PPO (`rlhf.combine_rewards`: the safety score where the prompt is tagged
     `is_safety` or the safety score is < 0.15, else the helpful score);
     with one RM, its score. Scores are sigmoid scores in [0, 1];
  3. keep the best of the K per prompt, and keep in a **pool the best response per prompt across all iterations so
     far** (the paper's fix for the regressions of using only the last iteration). The RMs are fixed during a run, so
     scores from its iterations are comparable. A pool carried over from an earlier run (`pool_from`: the previous
     RLHF round's, whose reward models were trained on fewer labels) is **re-scored by this run's reward models**
     before it is compared with anything (`rescore_pool`: every pooled answer's prompt + answer tokens + EOS through
     the same scoring function as the fresh samples, `score_answers`), so the selection compares one model's scores;
     only each prompt's pooled winner is carried between runs, so re-scoring can demote an earlier winner below a new
     answer but cannot bring back an answer that lost earlier. Truncated answers do not enter the pool (`rlhf.pool`:
     an SFT target cut mid-sentence would teach the policy to stop there); a prompt whose K answers were all cut
     keeps its earlier entry, if any (`sampling.keep_truncated=True`: it pools its best cut answer, which any
     complete answer outranks). An empty pool is a one-line error naming sampling.max_gen_len;
  4. write the pool as an SFT dataset (messages JSONL with `"train_on": "last"`: only the chosen answer is trained;
     earlier turns of a multi-turn prompt are context) and fine-tune the *current* policy on it with the SFT trainer
     (`training.rounds.fine_tune_round`: the SFT trainer's run with config `config.sft`, init_from = the policy).

Outputs: WORKDIR/iter_<i>/samples.jsonl (every sample and its scores), WORKDIR/iter_<i>/pool.jsonl (the SFT data;
each entry also keeps its prompt_index, reward, iteration and answer_tokens for the next round's `pool_from`),
WORKDIR/iter_<i>/sft/ (the fine-tuned policy: an init_from for PPO or the next round), WORKDIR/metrics.jsonl and
TensorBoard (the shared loop and tracker, `training.rounds.run_rounds`: one row of scalars per iteration at step
i + 1, whose "iteration" is i; `config.profile_steps` traces whole iterations, 1-based), WORKDIR/best_of_k.json and
WORKDIR/best_of_k.png (expected max reward of k samples, k = 1..K, per iteration: the unbiased estimator
`rlhf.best_of_k_curve`). A finished iteration is checkpointed by the loop and skipped when the command is re-run, so a
killed run resumes (the SFT trainer resumes from its own checkpoints). The reward models are an argument of `train`.

Distillation (the paper ran RS with the 70B only): fine-tune a smaller model on a pool with `python -m train.sft
--config.data.path=WORKDIR/iter_<i>/pool.jsonl`. Prompts (`llama2_jax.data.prompts`), reward-model loading
(`rlhf_setup.RewardCheckpoints`) and scoring (`rlhf.scoring_sequences`, `rlhf.score_sequences`) are shared with
`train.ppo`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama2_jax.cli import trainer as trainer_main
from llama2_jax.inference import decode, slot_sampler
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.rlhf import pool as answer_pool
from llama2_jax.rlhf import rollout
from llama2_jax.training import rounds
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.outputs import read_json, read_jsonl, write_json, write_jsonl
from llama2_jax.training.rlhf_setup import RewardCheckpoints, Rewards, load_prompts
from llama2_jax.training.setup import Run, Task, setup


def score_answers(reward_params, tokens, prompt_lens, lengths, is_safety, *, score_fns, eos_id: int,
                  threshold: float) -> dict[str, jax.Array]:
    """The reward models' sigmoid scores of prompt + answer (+ EOS, `rlhf.scoring_sequences`): tokens [B, S] (prompt
    then answer, right-padded with META_PAD_ID), prompt_lens [B], lengths [B] answer tokens, is_safety [B] ->
    {"helpful", "safety" (those given), "combined"} [B]. The one scoring path of fresh samples and pooled answers."""
    ids, ends = rlhf.scoring_sequences(tokens, prompt_lens, lengths, eos_id)
    return rlhf.score_sequences(score_fns, reward_params, ids, ends, is_safety, threshold)


def sample_and_score(policy_params, reward_params, prompt_tokens, prompt_lens, is_safety, rng, *, cfg,
                     score_fns, max_gen_len: int, temperature: float, top_p: float, eos_id: int, threshold: float,
                     mesh) -> dict[str, jax.Array]:
    """One batch, pure: sample, then score. Returns tokens [B, S], lengths [B] and the scores [B]."""
    out = decode.sample(policy_params, cfg, prompt_tokens, prompt_lens, rng, max_gen_len=max_gen_len,
                        temperature=temperature, top_p=top_p, eos_id=eos_id, mesh=mesh)
    return score(reward_params, out["tokens"], out["prompt_lens"], out["lengths"], out["truncated"], is_safety,
                 score_fns=score_fns, eos_id=eos_id, threshold=threshold)


def score(reward_params, tokens, prompt_lens, lengths, truncated, is_safety, *, score_fns, eos_id: int,
          threshold: float) -> dict[str, jax.Array]:
    """Score sampled rows (tokens [B, S] = prompt + response): tokens, lengths, truncated and the scores [B]."""
    scores = score_answers(reward_params, tokens, prompt_lens, lengths, is_safety, score_fns=score_fns, eos_id=eos_id,
                           threshold=threshold)
    return {"tokens": tokens, "lengths": lengths, "truncated": truncated, **scores}


class SlotSampler:
    """RS's sampling with config.rollout.engine = "slots": every (prompt, sample) row of an iteration through the
    decode slots at once (row (p, s) draws with `slot_sampler.sample_keys(rng, p, s)`), then the reward models in
    compiled calls of `sampling.batch_size` rows."""

    def __init__(self, config, cfg, score_fns, eos_id: int, mesh):
        s = config.sampling
        self.cfg, self.eos_id, self.mesh, self.sampling = cfg, eos_id, mesh, s
        self.n_slots = rollout.slot_count(config, s.batch_size)
        self.scorer = jax.jit(functools.partial(score, score_fns=score_fns, eos_id=eos_id,
                                                threshold=config.reward.safety_threshold))

    def sample_rows(self, policy_params, reward_params, order, arrays: dict, rng, temperature) -> list[dict]:
        """The rows `order` [(prompt, sample)] with their `arrays` (prompt_tokens [N, P], prompt_lens, is_safety):
        one dict of host arrays per row, as `rounds.sample_rows` returns them."""
        keys = slot_sampler.sample_keys(rng, [p for p, _ in order], [k for _, k in order])
        sampled = rollout.sample_with_slots(policy_params, self.cfg, arrays["prompt_tokens"], arrays["prompt_lens"],
                                            keys, n_slots=self.n_slots, max_gen_len=self.sampling.max_gen_len,
                                            temperature=float(temperature), top_p=self.sampling.top_p,
                                            eos_id=self.eos_id, mesh=self.mesh)
        sampled["is_safety"] = arrays["is_safety"]
        del sampled["done"]

        def score_call(rng, **rows):
            del rng
            return self.scorer(reward_params, **rows)

        return rounds.sample_rows(score_call, list(range(len(order))),
                                  lambda rows: {k: v[rows] for k, v in sampled.items()}, self.sampling.batch_size,
                                  self.mesh, rng)


# ----------------------------------------------------------------------------------------------------------------------
# One rejection-sampling iteration


def check_fields(config) -> None:
    """One-line ConfigErrors for the RS fields that need neither the model nor the mesh."""
    s = config.sampling
    if s.num_samples < 1 or s.max_gen_len < 1 or config.iterations < 1:
        raise ConfigError("config.sampling.num_samples, config.sampling.max_gen_len and config.iterations "
                          "must be >= 1")
    if any(t < 0 for t in s.temperature_schedule):
        raise ConfigError(f"config.sampling.temperature_schedule {tuple(s.temperature_schedule)}: every "
                          "temperature must be >= 0")
    if config.pool_from and not os.path.isfile(config.pool_from):
        raise ConfigError(f"config.pool_from: no such file {config.pool_from}")
    if config.first_iteration < 0:
        raise ConfigError(f"config.first_iteration {config.first_iteration} must be >= 0")
    if s.temperature < 0 or not 0 < s.top_p <= 1:
        raise ConfigError(f"config.sampling: temperature {s.temperature} must be >= 0 and top_p {s.top_p} in (0, 1]")


def check_config(config, mesh) -> None:
    """One-line ConfigErrors for the RS fields, before anything is loaded or compiled."""
    check_fields(config)
    rollout.check_engine(config)
    rounds.check_round_config(config, mesh)


def iteration_temperature(config, iteration: int) -> float:
    """The sampling temperature of an iteration: sampling.temperature_schedule[iteration] (its last value once the
    schedule is shorter than the run), or sampling.temperature when the schedule is empty. The paper re-tunes T at
    each iteration (Figure 8: the best T moves as the model changes)."""
    schedule = tuple(config.sampling.temperature_schedule)
    return float(schedule[min(iteration, len(schedule) - 1)]) if schedule else float(config.sampling.temperature)


def sample_all(config, sampler, policy_params, reward_params, encoded, prompts, iteration: int, mesh) -> dict:
    """K samples for every prompt in calls of `sampling.batch_size` rows. Returns host arrays: responses (token
    lists, [N][K]), scores {name: [N, K]} and truncated [N, K] (cut at max_gen_len)."""
    k, width = config.sampling.num_samples, config.prompts.max_prompt_len
    order = [(p, s) for p in range(len(encoded)) for s in range(k)]
    temperature = np.float32(iteration_temperature(config, iteration))

    def arrays(rows):
        tokens, lens = rounds.pad([encoded[p] for p, _ in rows], width)
        return {"prompt_tokens": tokens, "prompt_lens": lens, "is_safety": np.array([prompts[p].is_safety
                                                                                     for p, _ in rows])}

    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
    if isinstance(sampler, SlotSampler):  # every row through the slots, then the scores in calls of batch_size
        outputs = sampler.sample_rows(policy_params, reward_params, order, arrays(order), rng, temperature)
    else:
        call = functools.partial(sampler, policy_params, reward_params, temperature=temperature)
        outputs = rounds.sample_rows(call, order, arrays, config.sampling.batch_size, mesh, rng)
    responses = [[None] * k for _ in encoded]
    scores = {name: np.zeros((len(encoded), k), np.float32)
              for name in outputs[0].keys() - {"tokens", "lengths", "truncated"}}
    truncated = np.zeros((len(encoded), k), bool)
    for (p, s), out in zip(order, outputs):
        start = len(encoded[p])
        responses[p][s] = out["tokens"][start:start + out["lengths"]].tolist()
        truncated[p, s] = out["truncated"]
        for name in scores:
            scores[name][p, s] = out[name]
    return {"responses": responses, "scores": scores, "truncated": truncated}


def update_pool(pool: dict[int, dict], prompts, tokenizer, samples: dict, iteration: int,
                keep_truncated: bool = False) -> dict[int, dict]:
    """Best complete response per prompt of this iteration, merged into the pool (best across all iterations so far);
    truncated responses are left out, or with keep_truncated pooled only where no complete one exists
    (`rlhf.pool.best_answers`); empty responses are always left out."""
    combined = samples["scores"]["combined"]
    truncated = samples.get("truncated", np.zeros(combined.shape, bool))
    # An empty answer (EOS first) is no SFT target: pooled, it teaches the policy to say nothing (a tiny reward model
    # can score it highest; two rounds of that left a tiny policy whose every GAtt reply was empty).
    empty = np.array([[len(r) == 0 for r in row] for row in samples["responses"]], bool).reshape(combined.shape)
    pool = dict(pool)
    for p, best in enumerate(answer_pool.best_answers(combined, truncated, keep_truncated, excluded=empty)):
        if best < 0:  # every sample of this prompt was cut at max_gen_len (without keep_truncated) or empty
            continue
        prompt, cut, reward = prompts[p], bool(truncated[p, best]), float(combined[p, best])
        if p not in pool or (not cut, reward) > (not pool[p].get("truncated", False), pool[p]["reward"]):
            tokens = [int(t) for t in samples["responses"][p][best]]
            pool[p] = {"prompt_index": p, "messages": prompt.messages + [{"role": "assistant",
                                                                          "content": tokenizer.decode(tokens)}],
                       "train_on": "last", "reward": reward, "iteration": iteration, "truncated": cut,
                       "answer_tokens": tokens}
    return pool


# (prompt indices [M], answer token lists [M]) -> the current reward models' combined scores [M]
PoolScorer = Callable[[Sequence[int], Sequence[Sequence[int]]], np.ndarray]


def rescore_pool(pool: dict[int, dict], score_fn: PoolScorer, tokenizer) -> dict[int, dict]:
    """The pool with every entry's reward replaced by `score_fn`'s, in one batched call (a pool of an earlier run,
    scored by other reward models, becomes comparable with this run's samples). An entry's answer is its
    "answer_tokens" (the sampled tokens), or its text re-encoded for a pool written without them."""
    if not pool:
        return {}
    indices = sorted(pool)
    answers = [pool[p].get("answer_tokens") or tokenizer.encode(pool[p]["messages"][-1]["content"]) for p in indices]
    scores = np.asarray(score_fn(indices, answers), np.float64).reshape(-1)
    if scores.shape != (len(indices),):
        raise ValueError(f"the pool scorer returned {scores.size} scores for {len(indices)} pooled answers")
    return {p: {**pool[p], "reward": float(score)} for p, score in zip(indices, scores)}


def make_pool_scorer(config, rewards: Rewards, prompts, encoded, eos_id: int, mesh) -> PoolScorer:
    """`PoolScorer` of the reward models `rewards` on this run's prompts (`encoded`, their chat tokens): batches of
    config.sampling.batch_size rows through `score_answers`, the scoring of the fresh samples."""
    fn = jax.jit(functools.partial(score_answers, score_fns=rewards.fns, eos_id=eos_id,
                                   threshold=config.reward.safety_threshold))

    def score(indices, answers) -> np.ndarray:
        width = config.prompts.max_prompt_len + max(config.sampling.max_gen_len, *(len(a) for a in answers))

        def arrays(rows):
            tokens = rounds.pad([encoded[indices[j]] + list(answers[j]) for j in rows], width)[0]
            return {"tokens": tokens, "prompt_lens": np.array([len(encoded[indices[j]]) for j in rows], np.int32),
                    "lengths": np.array([len(answers[j]) for j in rows], np.int32),
                    "is_safety": np.array([prompts[indices[j]].is_safety for j in rows])}

        def call(rng, **batch):
            del rng  # scoring draws nothing
            return fn(rewards.params, **batch)

        out = rounds.sample_rows(call, list(range(len(indices))), arrays, config.sampling.batch_size, mesh,
                                 jax.random.PRNGKey(0))
        return np.array([row["combined"] for row in out], np.float64)

    return score


def check_pool_prompts(pool: dict[int, dict], prompts, path: str) -> None:
    """A carried-over pool is keyed by prompt index: each entry must hold this run's prompt of that index (the same
    config.prompts as the run that wrote it), else a one-line ConfigError."""
    for p, entry in sorted(pool.items()):
        if p >= len(prompts) or entry["messages"][:-1] != prompts[p].messages:
            raise ConfigError(f"config.pool_from {path}: its entry for prompt_index {p} is not this run's prompt {p} "
                              "(config.prompts must give the prompts of the run that wrote the pool, in its order)")


def iteration_metrics(samples: dict, pool: dict, iteration: int) -> dict:
    scores = samples["scores"]
    record = {"iteration": iteration, "prompts": int(scores["combined"].shape[0]),
              "samples_per_prompt": int(scores["combined"].shape[1]),
              "response_length": float(np.mean([len(r) for rs in samples["responses"] for r in rs]))}
    for name, values in scores.items():
        record[f"reward_{name}_mean"] = float(values.mean())
        record[f"reward_{name}_max"] = float(values.max())
    record["best_of_k_mean"] = float(scores["combined"].max(axis=1).mean())
    if "truncated" in samples:
        record["truncated_fraction"] = float(np.mean(samples["truncated"]))
    record["pool_reward_mean"] = float(np.mean([entry["reward"] for entry in pool.values()]))
    record["pool_from_earlier_iterations"] = int(sum(entry["iteration"] < iteration for entry in pool.values()))
    return record


def write_samples(path: str, prompts, tokenizer, samples: dict) -> None:
    write_jsonl(path, ({"prompt": prompt.messages, "is_safety": prompt.is_safety,
                        "responses": [tokenizer.decode(r) for r in samples["responses"][p]],
                        "response_tokens": [len(r) for r in samples["responses"][p]],
                        "truncated": samples["truncated"][p].tolist(),
                        **{name: values[p].tolist() for name, values in samples["scores"].items()}}
                       for p, prompt in enumerate(prompts)))


def read_pool(path: str) -> dict[int, dict]:
    """The pool of a pool.jsonl by prompt index ("" = empty: a run without config.pool_from)."""
    if not path:
        return {}
    return {record["prompt_index"]: record for record in read_jsonl(path)}


# ----------------------------------------------------------------------------------------------------------------------
# Report: best-of-K curves


def write_best_of_k(workdir: str, curves: dict[int, list[float]]) -> None:
    """WORKDIR/best_of_k.json ({iteration: [E max of k, k = 1..K]}) and best_of_k.png (one curve per iteration)."""
    write_json(os.path.join(workdir, "best_of_k.json"), {str(i): curve for i, curve in sorted(curves.items())})
    if jax.process_index() != 0:
        return
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(6, 4))
    for iteration, curve in sorted(curves.items()):
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=f"iteration {iteration}")
    ax.set_xlabel("K (samples per prompt)")
    ax.set_ylabel("expected max reward (combined, sigmoid)")
    ax.set_title("Rejection sampling: best of K")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "best_of_k.png"), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# The trainer


def make_sampler(config, cfg, score_fns, eos_id: int, mesh):
    if rollout.uses_slots(config):
        return SlotSampler(config, cfg, score_fns, eos_id, mesh)
    s = config.sampling
    return jax.jit(functools.partial(
        sample_and_score, cfg=cfg, score_fns=score_fns, max_gen_len=s.max_gen_len, top_p=s.top_p, eos_id=eos_id,
        threshold=config.reward.safety_threshold, mesh=mesh), compiler_options=decode.DECODE_COMPILER_OPTIONS)


def check_model(config, cfg, mesh, *, rewards) -> None:
    check_config(config, mesh)
    rounds.check_generation_length(config, cfg)
    rewards.check(config, cfg)


def rs_task(rewards) -> Task:
    return Task("rejection_sampling", check=check_fields,
                check_model=functools.partial(check_model, rewards=rewards),
                make_data=lambda config, tokenizer, raw: load_prompts(config, tokenizer), seq_len=False,
                init_from_required=True, lora=False, eval_tasks=False, writes_model=False)


def carried_pool(config, prompts, tokenizer, score_fn: PoolScorer) -> tuple[dict[int, dict], dict]:
    """The pool of config.pool_from re-scored by this run's reward models (`score_fn`), and its figures: how many
    answers were re-scored and their mean reward before and after."""
    pool = read_pool(config.pool_from)
    if not pool:
        return {}, {}
    check_pool_prompts(pool, prompts, config.pool_from)
    rescored = rescore_pool(pool, score_fn, tokenizer)
    return rescored, {"pool_rescored": len(rescored),
                      "pool_rescored_reward_before_mean": float(np.mean([e["reward"] for e in pool.values()])),
                      "pool_rescored_reward_mean": float(np.mean([e["reward"] for e in rescored.values()]))}


def make_round(run: Run, sampler, rewards: Rewards, curves: dict):
    """One round (`training.rounds`): sample from the current policy, score, pool, fine-tune."""
    config, workdir, tokenizer = run.config, run.workdir, run.tokenizer
    prompts, encoded = run.data
    pool_scorer = make_pool_scorer(config, rewards, prompts, encoded, tokenizer.eos_id, run.mesh)

    def one_round(i: int) -> dict:
        iter_dir, previous = os.path.join(workdir, f"iter_{i}"), os.path.join(workdir, f"iter_{i - 1}")
        policy_dir = rounds.sft_dir(previous) if i else config.init_from
        rescored = {}
        if i:  # scored by this run's reward models already
            pool = read_pool(os.path.join(previous, "pool.jsonl"))
        else:
            pool, rescored = carried_pool(config, prompts, tokenizer, pool_scorer)
        params = rounds.load_policy(policy_dir, run.model_cfg, run.mesh)
        samples = sample_all(config, sampler, params, rewards.params, encoded, prompts, i, run.mesh)
        del params
        number = config.first_iteration + i  # the iteration's number in the pool (rounds: across runs)
        pool = update_pool(pool, prompts, tokenizer, samples, number, config.sampling.keep_truncated)
        if not pool:
            raise ConfigError(
                f"rejection sampling iteration {i}: every sampled answer was cut at config.sampling."
                f"max_gen_len={config.sampling.max_gen_len} (none ended with EOS), so there is nothing to fine-tune "
                "on; raise max_gen_len or set config.sampling.keep_truncated=True")
        pool_path = os.path.join(iter_dir, "pool.jsonl")
        write_samples(os.path.join(iter_dir, "samples.jsonl"), prompts, tokenizer, samples)
        write_jsonl(pool_path, (pool[p] for p in sorted(pool)))
        multihost_utils.sync_global_devices(f"rs pool {i}")
        curves[i] = rlhf.best_of_k_curve(samples["scores"]["combined"]).tolist()
        record = {**iteration_metrics(samples, pool, number), **rescored,
                  "temperature": iteration_temperature(config, i)}
        print_iteration(record, curves[i])
        write_best_of_k(workdir, curves)
        rounds.fine_tune_round(config, init_from=policy_dir, data_path=pool_path, tokenizer_path=tokenizer.model_path,
                               workdir=rounds.sft_dir(iter_dir), seed=config.seed + i)
        return record

    return one_round


def train(config, workdir: str, rewards: RewardCheckpoints | Rewards) -> TrainResult:
    """config.iterations rounds of sample -> score -> pool -> SFT with these reward models; the history has one row
    per iteration, the summary the best-of-K curves ({iteration: [E max of k, k = 1..K]})."""
    run = setup(config, workdir, rs_task(rewards))
    reward_models = rewards.load(run.config, run.mesh, run.model_cfg)
    sampler = make_sampler(run.config, run.model_cfg, reward_models.fns, run.tokenizer.eos_id, run.mesh)
    print(f"rejection sampling: {len(run.data[0])} prompts x {config.sampling.num_samples} samples, "
          f"{config.iterations} iteration(s), reward models: {', '.join(reward_models.fns)}")
    curves = {int(i): curve for i, curve in read_json(os.path.join(workdir, "best_of_k.json"), {}).items()}
    result = rounds.run_rounds(run, config.iterations, make_round(run, sampler, reward_models, curves))
    finished = int(jax.device_get(result.state.step))
    result.summary["best_of_k"] = {i: curves[i] for i in range(finished)}
    result.product = rounds.sft_dir(workdir, f"iter_{finished - 1}") if finished else config.init_from
    print(f"final policy: {result.product}")
    return result


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """Rejection sampling with the reward models of config.reward's checkpoints."""
    return exit_if_interrupted(train(config, workdir, RewardCheckpoints()))


def print_iteration(record: dict, curve: list[float]) -> None:
    if jax.process_index() != 0:
        return
    shown = ", ".join(f"{v:.3f}" for v in curve)
    print(f"iteration {record['iteration']}: reward mean {record['reward_combined_mean']:.4f} max "
          f"{record['reward_combined_max']:.4f} best-of-K {record['best_of_k_mean']:.4f} pool "
          f"{record['pool_reward_mean']:.4f} ({record['pool_from_earlier_iterations']} kept from earlier iterations)"
          f"\n  E[max of k], k = 1..{len(curve)}: {shown}", flush=True)
    if record.get("pool_rescored"):
        print(f"  carried-over pool: {record['pool_rescored']} answers re-scored by this run's reward models, mean "
              f"{record['pool_rescored_reward_before_mean']:.4f} -> {record['pool_rescored_reward_mean']:.4f}",
              flush=True)


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "Rejection-sampling config (configs/rs_*.py).")
