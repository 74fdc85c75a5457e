r"""Rejection-sampling fine-tuning (paper section 3.2.3): `python -m train.rejection_sampling --config=configs/rs_tiny.py
    --workdir=DIR --config.init_from=POLICY --config.reward.helpful_path=RM [--config.reward.safety_path=RM]
    --config.prompts.path=PROMPTS.jsonl`.

Per iteration i = 0 .. iterations - 1:
  1. sample K = `sampling.num_samples` responses per prompt from the current policy (`init_from` for i = 0, then the
     previous iteration's SFT workdir) at `sampling.temperature`, or at `sampling.temperature_schedule[i]` when a
     schedule is given (the paper re-tunes T each iteration; paper: best at T = 1.2-1.3 for 10-100 samples), with
     the compiled sampler on the mesh (`decode.sample` inside one jit with the reward models);
  2. score prompt + response (+ EOS, appended to responses cut at max_gen_len: the RMs read their score at the EOS
     that ends an answer; such answers are marked truncated, `decode.truncated_rows`) with the reward model(s): with
     both RMs, the piecewise rule of PPO (`rlhf.combine_rewards`: the safety score where the prompt is tagged
     `is_safety` or the safety score is < 0.15, else the helpful score);
     with one RM, its score. Scores are sigmoid scores in [0, 1];
  3. keep the best of the K per prompt, and keep in a **pool the best response per prompt across all iterations so
     far** (the paper's fix for the regressions of using only the last iteration). The RMs are fixed during a run, so
     scores from different iterations are comparable. Truncated answers do not enter the pool (`rlhf.pool`: an SFT
     target cut mid-sentence would teach the policy to stop there); a prompt whose K answers were all cut keeps its
     earlier entry, if any (`sampling.keep_truncated=True`: it pools its best cut answer, which any complete answer
     outranks). An empty pool is a one-line error naming sampling.max_gen_len;
  4. write the pool as an SFT dataset (messages JSONL with `"train_on": "last"`: only the chosen answer is trained;
     earlier turns of a multi-turn prompt are context) and fine-tune the *current* policy on it with the SFT trainer
     (`common.fine_tune`, the SFT trainer's run, with config `config.sft` and init_from = the current policy).

Outputs: WORKDIR/iter_<i>/samples.jsonl (every sample and its scores), WORKDIR/iter_<i>/pool.jsonl (the SFT data),
WORKDIR/iter_<i>/sft/ (the fine-tuned policy: an init_from for PPO or the next round), WORKDIR/metrics.jsonl and
TensorBoard (`llama2_jax.training.loop.Tracker`: one record of scalars per iteration, step = iteration; `config.profile_steps`
traces the sampling and scoring of those iterations, 1-based), WORKDIR/best_of_k.json and WORKDIR/best_of_k.png
(expected max reward of k samples, k = 1..K, per iteration: the unbiased estimator `rlhf.best_of_k_curve`). A
finished iteration (iter_<i>/DONE) is skipped when the command is re-run, so a killed run resumes (the SFT trainer
resumes from its own checkpoints).

Distillation (the paper ran RS with the 70B only): fine-tune a smaller model on a pool with `python -m train.sft
--config.data.path=WORKDIR/iter_<i>/pool.jsonl`. Prompts (`llama2_jax.data.prompts`), reward-model loading
(`common.load_reward_models`) and scoring (`rlhf.scoring_sequences`, `rlhf.score_sequences`) are shared with
`train.ppo`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama2_jax.checkpoints import params_io as param_checkpoint
from llama2_jax.cli import trainer as trainer_main
from llama2_jax.inference import decode, generate
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import abstract_params
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.rlhf import pool as answer_pool
from llama2_jax.training import common, loop

_log = logging.getLogger(__name__)


def sample_and_score(policy_params, reward_params, prompt_tokens, prompt_lens, is_safety, rng, *, cfg,
                     score_fns, max_gen_len: int, temperature: float, top_p: float, eos_id: int, threshold: float,
                     mesh) -> dict[str, jax.Array]:
    """One batch, pure: sample, then score. Returns tokens [B, S], lengths [B] and the scores [B]."""
    out = decode.sample(policy_params, cfg, prompt_tokens, prompt_lens, rng, max_gen_len=max_gen_len,
                          temperature=temperature, top_p=top_p, eos_id=eos_id, mesh=mesh)
    ids, lengths = rlhf.scoring_sequences(out["tokens"], out["prompt_lens"], out["lengths"], eos_id)
    scores = rlhf.score_sequences(score_fns, reward_params, ids, lengths, is_safety, threshold)
    return {"tokens": out["tokens"], "lengths": out["lengths"], "truncated": out["truncated"], **scores}


# ----------------------------------------------------------------------------------------------------------------------
# One rejection-sampling iteration


def check_config(config, mesh) -> None:
    """One-line ConfigErrors for the RS fields, before anything is loaded or compiled."""
    s = config.sampling
    if s.num_samples < 1 or s.max_gen_len < 1 or config.iterations < 1:
        raise common.ConfigError("config.sampling.num_samples, config.sampling.max_gen_len and config.iterations "
                                 "must be >= 1")
    if any(t < 0 for t in s.temperature_schedule):
        raise common.ConfigError(f"config.sampling.temperature_schedule {tuple(s.temperature_schedule)}: every "
                                 "temperature must be >= 0")
    if s.temperature < 0 or not 0 < s.top_p <= 1:
        raise common.ConfigError(f"config.sampling: temperature {s.temperature} must be >= 0 and top_p {s.top_p} in "
                                 "(0, 1]")
    if s.batch_size < 1 or s.batch_size % sh.data_parallel_size(mesh):
        raise common.ConfigError(f"config.sampling.batch_size ({s.batch_size}) must be a positive multiple of the "
                                 f"data-parallel size {sh.data_parallel_size(mesh)}")


def iteration_temperature(config, iteration: int) -> float:
    """The sampling temperature of an iteration: sampling.temperature_schedule[iteration] (its last value once the
    schedule is shorter than the run), or sampling.temperature when the schedule is empty. The paper re-tunes T at
    each iteration (Figure 8: the best T moves as the model changes)."""
    schedule = tuple(config.sampling.temperature_schedule)
    return float(schedule[min(iteration, len(schedule) - 1)]) if schedule else float(config.sampling.temperature)


def sample_all(config, sampler, policy_params, reward_params, encoded, prompts, iteration: int, mesh) -> dict:
    """K samples for every prompt in batches of `sampling.batch_size` rows. Returns host arrays: responses (token
    lists, [N][K]), scores {name: [N, K]} and truncated [N, K] (cut at max_gen_len)."""
    k, rows = config.sampling.num_samples, config.sampling.batch_size
    order = [(p, s) for p in range(len(encoded)) for s in range(k)]
    responses = [[None] * k for _ in encoded]
    scores: dict[str, np.ndarray] = {}
    truncated = np.zeros((len(encoded), k), bool)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), iteration)
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        padded = chunk + [chunk[0]] * (rows - len(chunk))
        tokens, lens = generate.pad_prompts([encoded[p] for p, _ in padded], generate.META_PAD_ID,
                                            config.prompts.max_prompt_len, bucket=config.prompts.max_prompt_len)
        safety = np.array([prompts[p].is_safety for p, _ in padded])
        to_global = functools.partial(common.host_to_global, mesh=mesh)
        out = common.to_host(sampler(policy_params, reward_params, to_global(tokens), to_global(lens),
                                     to_global(safety), jax.random.fold_in(rng, start),
                                     temperature=np.float32(iteration_temperature(config, iteration))))
        for row, (p, s) in enumerate(chunk):
            responses[p][s] = out["tokens"][row, lens[row]:lens[row] + out["lengths"][row]].tolist()
            truncated[p, s] = out["truncated"][row]
            for name in out.keys() - {"tokens", "lengths", "truncated"}:
                scores.setdefault(name, np.zeros((len(encoded), k), np.float32))[p, s] = out[name][row]
    return {"responses": responses, "scores": scores, "truncated": truncated}


def update_pool(pool: dict[int, dict], prompts, tokenizer, samples: dict, iteration: int,
                keep_truncated: bool = False) -> dict[int, dict]:
    """Best complete response per prompt of this iteration, merged into the pool (best across all iterations so far);
    truncated responses are left out, or with keep_truncated pooled only where no complete one exists
    (`rlhf.pool.best_answers`)."""
    combined = samples["scores"]["combined"]
    truncated = samples.get("truncated", np.zeros(combined.shape, bool))
    pool = dict(pool)
    for p, best in enumerate(answer_pool.best_answers(combined, truncated, keep_truncated)):
        if best < 0:  # every sample of this prompt was cut at max_gen_len
            continue
        prompt, cut, reward = prompts[p], bool(truncated[p, best]), float(combined[p, best])
        if p not in pool or (not cut, reward) > (not pool[p].get("truncated", False), pool[p]["reward"]):
            answer = tokenizer.decode(samples["responses"][p][best])
            pool[p] = {"prompt_index": p, "messages": prompt.messages + [{"role": "assistant", "content": answer}],
                       "train_on": "last", "reward": reward, "iteration": iteration, "truncated": cut}
    return pool


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


def write_jsonl(path: str, records) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_samples(path: str, prompts, tokenizer, samples: dict) -> None:
    write_jsonl(path, ({"prompt": prompt.messages, "is_safety": prompt.is_safety,
                        "responses": [tokenizer.decode(r) for r in samples["responses"][p]],
                        "truncated": samples["truncated"][p].tolist(),
                        **{name: values[p].tolist() for name, values in samples["scores"].items()}}
                       for p, prompt in enumerate(prompts)))


def read_pool(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {record["prompt_index"]: record for record in map(json.loads, f)}


def fine_tune(config, policy_dir: str, pool_path: str, tokenizer_path: str, workdir: str, iteration: int) -> None:
    """SFT of the current policy on the pool (config.sft with init_from, data and tokenizer filled in)."""
    sft = config.sft.copy_and_resolve_references()
    sft.init_from, sft.data.path, sft.tokenizer.path = policy_dir, pool_path, tokenizer_path
    sft.mesh = config.mesh
    sft.seed = config.seed + iteration
    common.fine_tune(sft, workdir)


# ----------------------------------------------------------------------------------------------------------------------
# Report: best-of-K curves


def write_best_of_k(workdir: str, curves: dict[int, list[float]]) -> None:
    """WORKDIR/best_of_k.json ({iteration: [E max of k, k = 1..K]}) and best_of_k.png (one curve per iteration)."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "best_of_k.json"), "w") as f:
        json.dump({str(i): curve for i, curve in sorted(curves.items())}, f, indent=2)
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
    s = config.sampling
    return jax.jit(functools.partial(
        sample_and_score, cfg=cfg, score_fns=score_fns, max_gen_len=s.max_gen_len, top_p=s.top_p, eos_id=eos_id, threshold=config.reward.safety_threshold, mesh=mesh),
        compiler_options=decode.DECODE_COMPILER_OPTIONS)


def train_and_evaluate(config, workdir: str, score_fns: Optional[dict[str, rlhf.ScoreFn]] = None,
                       reward_params: Optional[dict] = None) -> list[dict]:
    """Run config.iterations rounds of sample -> score -> pool -> SFT; returns the per-iteration records.

    score_fns / reward_params: stand-in reward models ({"helpful"/"safety": fn(params, tokens, lengths) -> sigmoid
    scores}) instead of config.reward's checkpoints (tests)."""
    common.check_shared_fields(config)  # before the trainer's own fields
    mesh = common.make_mesh(config)
    check_config(config, mesh)
    loop.LoopSettings.from_config(config)  # profile_steps and wandb checked before anything is read or compiled
    cfg = common.resolve_model_config(config, required=True)
    if config.prompts.max_prompt_len + config.sampling.max_gen_len > cfg.max_seq_len:
        raise common.ConfigError(f"config.prompts.max_prompt_len + config.sampling.max_gen_len exceeds the policy's "
                                 f"max_seq_len {cfg.max_seq_len}")
    common.check_workdir(workdir, cfg, init_from=config.init_from)
    common.lock_workdir(workdir)
    tokenizer = common.load_tokenizer(config, cfg.vocab_size)
    prompts, encoded = common.load_prompts(config, tokenizer)
    if score_fns is None:
        score_fns, reward_params = common.load_reward_models(config, mesh, cfg.vocab_size)
    sampler = make_sampler(config, cfg, score_fns, tokenizer.eos_id, mesh)
    print(f"rejection sampling: {len(prompts)} prompts x {config.sampling.num_samples} samples, "
          f"{config.iterations} iteration(s), reward models: {', '.join(score_fns)}")

    policy_dir, pool, curves, history = config.init_from, {}, read_curves(workdir), []
    # profile_steps counts iterations (1-based) and traces their sampling and scoring; the SFT rounds have their own
    # loop and field (config.sft.profile_steps).
    tracker, profiler = loop.Tracker.from_config(config, workdir), loop.Profiler.from_config(config, workdir)
    for iteration in range(config.iterations):
        iter_dir = os.path.join(workdir, f"iter_{iteration}")
        pool_path, sft_dir = os.path.join(iter_dir, "pool.jsonl"), os.path.join(iter_dir, "sft")
        if os.path.exists(os.path.join(iter_dir, "DONE")):  # resume: this iteration finished earlier
            pool, policy_dir = read_pool(pool_path), sft_dir
            continue
        params, _ = param_checkpoint.load_params(policy_dir, cfg, shardings=policy_shardings(cfg, mesh))
        profiler.before_step(iteration + 1)
        samples = sample_all(config, sampler, params, reward_params, encoded, prompts, iteration, mesh)
        profiler.after_step(iteration + 1)  # sample_all returns host arrays: the device work is done
        del params
        pool = update_pool(pool, prompts, tokenizer, samples, iteration, config.sampling.keep_truncated)
        if not pool:
            raise common.ConfigError(
                f"rejection sampling iteration {iteration}: every sampled answer was cut at config.sampling."
                f"max_gen_len={config.sampling.max_gen_len} (none ended with EOS), so there is nothing to fine-tune "
                "on; raise max_gen_len or set config.sampling.keep_truncated=True")
        write_samples(os.path.join(iter_dir, "samples.jsonl"), prompts, tokenizer, samples)
        write_jsonl(pool_path, (pool[p] for p in sorted(pool)))
        multihost_utils.sync_global_devices(f"rs pool {iteration}")
        curves[iteration] = rlhf.best_of_k_curve(samples["scores"]["combined"]).tolist()
        record = {**iteration_metrics(samples, pool, iteration),
                  "temperature": iteration_temperature(config, iteration), "best_of_k": curves[iteration]}
        history.append(record)
        log_iteration(tracker, record)
        write_best_of_k(workdir, curves)
        fine_tune(config, policy_dir, pool_path, tokenizer.model_path, sft_dir, iteration)
        policy_dir = sft_dir
        write_jsonl(os.path.join(iter_dir, "DONE"), [{"policy": sft_dir}])
    profiler.stop()
    tracker.close()
    print(f"final policy: {policy_dir}")
    return history


def policy_shardings(cfg, mesh):
    return sh.tree_shardings(abstract_params(cfg, boxed=True), mesh)


def read_curves(workdir: str) -> dict[int, list[float]]:
    """The best-of-K curves of finished iterations (resume)."""
    path = os.path.join(workdir, "best_of_k.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {int(i): curve for i, curve in json.load(f).items()}


def log_iteration(tracker: loop.Tracker, record: dict) -> None:
    """The iteration's scalars through the Tracker (step = iteration; the curve itself is in best_of_k.json)."""
    tracker.write(record["iteration"], {k: v for k, v in record.items() if k not in ("iteration", "best_of_k")})
    if jax.process_index() != 0:
        return
    curve = ", ".join(f"{v:.3f}" for v in record["best_of_k"])
    print(f"iteration {record['iteration']}: reward mean {record['reward_combined_mean']:.4f} max "
          f"{record['reward_combined_max']:.4f} best-of-K {record['best_of_k_mean']:.4f} pool "
          f"{record['pool_reward_mean']:.4f} ({record['pool_from_earlier_iterations']} kept from earlier iterations)"
          f"\n  E[max of k], k = 1..{len(record['best_of_k'])}: {curve}")


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "Rejection-sampling config (configs/rs_*.py).")
