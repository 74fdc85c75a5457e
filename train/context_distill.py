r"""Safety context distillation (paper section 4.2.4): `python -m train.context_distill --config=configs/cd_tiny.py
    --workdir=DIR --config.init_from=POLICY --config.reward.safety_path=RM --config.prompts.path=PROMPTS`.

  1. the adversarial prompts of config.prompts (those tagged is_safety; `--config.prompts.is_safety=True` tags a
     whole untagged file such as HH harmless) are answered twice by the policy (config.rollout.engine: every answer
     through decode slots, then the scores in compiled calls; or "batch": one compiled sample+score call per batch):
     with a safety preprompt (the prompt's risk-category preprompt with its answer template when the prompt has a
     `risk_category` and `distill.use_categories`, else a generic one; texts in llama2_jax/data/safety_preprompts.json
     or `distill.preprompts_path`) and without it;
  2. the safety RM scores both answers after the prompt *without* the preprompt (the context the model will be trained
     in); the distilled answer is kept only when it scores above the original one (targeted context distillation,
     `llama2_jax.rlhf.context_distill`);
  3. the kept (prompt without preprompt, distilled answer) pairs are an SFT dataset (loss on the answer only), and the
     policy is fine-tuned on it with the SFT trainer's run (`training.rounds.fine_tune_round`, config.sft).

Outputs: WORKDIR/samples.jsonl (both answers and scores per prompt), WORKDIR/distill.jsonl (the SFT data),
WORKDIR/distill.json (kept fraction, mean safety-RM gain of kept vs all), WORKDIR/sft/ (the distilled policy: an
init_from). The one round runs on the shared loop (`training.rounds`); a re-run reuses finished samples
(WORKDIR/distill.json) and the SFT trainer resumes from its checkpoints. The safety RM is an argument of `train`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data import safety_preprompts
from llama2_jax.inference import decode, generate, slot_sampler
from llama2_jax.rlhf import context_distill as cd
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.rlhf import rollout
from llama2_jax.text import chat_format as chat
from llama2_jax.training import rounds
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.outputs import read_json, write_json, write_jsonl
from llama2_jax.training.rlhf_setup import RewardCheckpoints, Rewards, load_prompts
from llama2_jax.training.setup import Run, Task, setup


def check_fields(config) -> None:
    """One-line ConfigErrors for the distillation fields, before anything is loaded or compiled."""
    s = config.sampling
    if not config.reward.safety_path:
        raise ConfigError("config.reward.safety_path is empty: context distillation keeps answers by the "
                          "safety RM's score")
    if s.max_gen_len < 1 or s.temperature < 0 or not 0 < s.top_p <= 1:
        raise ConfigError(f"config.sampling: max_gen_len {s.max_gen_len} must be >= 1, temperature "
                          f"{s.temperature} >= 0 and top_p {s.top_p} in (0, 1]")
    if s.batch_size < 2 or s.batch_size % 2:
        raise ConfigError(f"config.sampling.batch_size ({s.batch_size}) must be even (two rows per prompt)")
    rollout.check_engine(config)


def check_model(config, cfg, mesh, *, rewards) -> None:
    rounds.check_round_config(config, mesh)
    rounds.check_generation_length(config, cfg)
    rewards.check(config, cfg)
    load_table(config)


def load_table(config) -> safety_preprompts.PrepromptTable:
    try:
        return safety_preprompts.load_table(config.distill.preprompts_path or None)
    except (ValueError, OSError) as error:
        raise ConfigError(f"config.distill.preprompts_path: {error}") from None


def adversarial_prompts(config, tokenizer, table) -> tuple[list, list[list[int]], list[list[int]]]:
    """(prompts, encodings with the preprompt, encodings without) of the safety-tagged prompts whose preprompted
    encoding fits in max_prompt_len (the others are dropped and counted)."""
    prompts, _ = load_prompts(config, tokenizer)
    adversarial = [p for p in prompts if p.is_safety]
    if not adversarial:
        raise ConfigError(f"config.prompts: none of the {len(prompts)} prompts is tagged is_safety (pass "
                          "--config.prompts.is_safety=True for a file of adversarial prompts)")
    kept, with_pre, without = [], [], []
    for i, prompt in enumerate(adversarial):
        try:
            preprompt = table.preprompt_for(i, prompt.risk_category, use_categories=config.distill.use_categories)
        except ValueError as error:
            raise ConfigError(f"config.prompts: prompt {i}: {error}") from None
        tokens = chat.encode_dialog(tokenizer, cd.with_preprompt(prompt.messages, preprompt))
        if len(tokens) <= config.prompts.max_prompt_len:
            kept.append(prompt)
            with_pre.append(tokens)
            without.append(chat.encode_dialog(tokenizer, prompt.messages))
    if not kept:
        raise ConfigError(f"config.prompts.max_prompt_len ({config.prompts.max_prompt_len}) is shorter than "
                          "every prompt with its preprompt")
    print(f"context distillation: {len(kept)} adversarial prompts ({len(adversarial) - len(kept)} too long with the "
          f"preprompt, {len(prompts) - len(adversarial)} not tagged is_safety)")
    return kept, with_pre, without


def sample_and_score(policy_params, safety_params, prompt_tokens, prompt_lens, score_tokens, score_lens, rng, *,
                     cfg, safety_fn, max_gen_len: int, temperature: float, top_p: float, eos_id: int, mesh):
    """Sample after `prompt_tokens` [B, P]; score the answer after `score_tokens` [B, P] (the prompt without the
    preprompt) with the safety RM. Returns the answers' tokens [B, max_gen_len], lengths [B] and scores [B]."""
    out = decode.sample(policy_params, cfg, prompt_tokens, prompt_lens, rng, max_gen_len=max_gen_len,
                        temperature=temperature, top_p=top_p, eos_id=eos_id, mesh=mesh)
    return score_answers(safety_params, out["tokens"], prompt_lens, out["lengths"], score_tokens, score_lens,
                         safety_fn=safety_fn, max_gen_len=max_gen_len, eos_id=eos_id)


def score_answers(safety_params, tokens, prompt_lens, lengths, score_tokens, score_lens, *, safety_fn,
                  max_gen_len: int, eos_id: int):
    """Sampled rows (tokens [B, S] = prompt + answer) -> the answers [B, max_gen_len], lengths [B] and their safety
    scores [B] after `score_tokens` [B, P] (the prompt without the preprompt)."""
    answers = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, max_gen_len))(
        tokens, prompt_lens)  # [B, max_gen_len]: the generated tokens
    answers = jnp.where(jnp.arange(max_gen_len)[None, :] < lengths[:, None], answers, generate.META_PAD_ID)
    room = jnp.full_like(answers, generate.META_PAD_ID)
    placed = jax.vmap(lambda row, answer, start: jax.lax.dynamic_update_slice_in_dim(row, answer, start, 0))(
        jnp.concatenate([score_tokens, room], axis=1), answers, score_lens)  # context + answer [B, P + max_gen_len]
    ids, score_seq_lens = rlhf.scoring_sequences(placed, score_lens, lengths, eos_id)
    return {"answers": answers, "lengths": lengths, "safety": safety_fn(safety_params, ids, score_seq_lens)}


class SlotSampler:
    """Sampling with config.rollout.engine = "slots": both answers of every prompt through the decode slots at once
    (row (p, variant) draws with `slot_sampler.sample_keys(rng, p, variant)`), then the safety RM in compiled calls
    of `sampling.batch_size` rows."""

    def __init__(self, config, cfg, safety_fn, eos_id: int, mesh):
        self.config, self.cfg, self.eos_id, self.mesh = config, cfg, eos_id, mesh
        self.scorer = jax.jit(functools.partial(score_answers, safety_fn=safety_fn,
                                                max_gen_len=config.sampling.max_gen_len, eos_id=eos_id))

    def sample_rows(self, params, safety_params, order, arrays: dict, rng) -> list[dict]:
        """One dict of host arrays per row of `order`, as `rounds.sample_rows` returns them."""
        s = self.config.sampling
        keys = slot_sampler.sample_keys(rng, [p for p, _ in order], [v for _, v in order])
        sampled = rollout.sample_with_slots(params, self.cfg, arrays["prompt_tokens"], arrays["prompt_lens"], keys,
                                            n_slots=rollout.slot_count(self.config, s.batch_size),
                                            max_gen_len=s.max_gen_len, temperature=s.temperature, top_p=s.top_p,
                                            eos_id=self.eos_id, mesh=self.mesh)
        rows = {"tokens": sampled["tokens"], "prompt_lens": arrays["prompt_lens"], "lengths": sampled["lengths"],
                "score_tokens": arrays["score_tokens"], "score_lens": arrays["score_lens"]}

        def score_call(rng, **picked):
            del rng
            return self.scorer(safety_params, **picked)

        return rounds.sample_rows(score_call, list(range(len(order))), lambda i: {k: v[i] for k, v in rows.items()},
                                  s.batch_size, self.mesh, rng)


def sample_both(config, sampler, params, safety_params, with_pre, without, mesh) -> dict[str, list]:
    """Per prompt: the answer with the preprompt and the one without (token lists) and their safety scores."""
    width = config.prompts.max_prompt_len
    order = [(p, variant) for p in range(len(without)) for variant in (0, 1)]  # 0: with the preprompt, 1: without

    def arrays(rows):
        tokens, lens = rounds.pad([(with_pre if v == 0 else without)[p] for p, v in rows], width)
        context, context_lens = rounds.pad([without[p] for p, _ in rows], width)
        return {"prompt_tokens": tokens, "prompt_lens": lens, "score_tokens": context, "score_lens": context_lens}

    rng = jax.random.PRNGKey(config.seed)
    if isinstance(sampler, SlotSampler):
        outputs = sampler.sample_rows(params, safety_params, order, arrays(order), rng)
    else:
        outputs = rounds.sample_rows(functools.partial(sampler, params, safety_params), order, arrays,
                                     config.sampling.batch_size, mesh, rng)
    answers, scores = [[None, None] for _ in without], np.zeros((len(without), 2), np.float32)
    for (p, v), out in zip(order, outputs):
        answers[p][v] = out["answers"][:out["lengths"]].tolist()
        scores[p, v] = out["safety"]
    return {"answers": answers, "scores": scores}


def make_sampler(config, cfg, safety_fn, eos_id: int, mesh):
    """The sampler `sample_both` runs: a `SlotSampler` (config.rollout.engine = "slots"), or `sample_and_score`
    compiled for one batch of rows ("batch")."""
    if rollout.uses_slots(config):
        return SlotSampler(config, cfg, safety_fn, eos_id, mesh)
    s = config.sampling
    return jax.jit(functools.partial(
        sample_and_score, cfg=cfg, safety_fn=safety_fn, max_gen_len=s.max_gen_len, temperature=s.temperature,
        top_p=s.top_p, eos_id=eos_id, mesh=mesh), compiler_options=decode.DECODE_COMPILER_OPTIONS)


def distill(run: Run, rewards: Rewards) -> dict:
    """Sample, score, keep and write WORKDIR/samples.jsonl, distill.jsonl and distill.json; returns the metrics."""
    config, tokenizer, cfg, mesh, workdir = run.config, run.tokenizer, run.model_cfg, run.mesh, run.workdir
    prompts, with_pre, without = run.data
    sampler = make_sampler(config, cfg, rewards.fns["safety"], tokenizer.eos_id, mesh)
    params = rounds.load_policy(config.init_from, cfg, mesh)
    samples = sample_both(config, sampler, params, rewards.params["safety"], with_pre, without, mesh)
    del params
    texts = [[tokenizer.decode(a) for a in pair] for pair in samples["answers"]]
    distilled, original = samples["scores"][:, 0], samples["scores"][:, 1]
    keep = cd.targeted_keep(distilled, original)
    write_jsonl(os.path.join(workdir, "samples.jsonl"), (
        {"prompt": p.messages, "risk_category": p.risk_category, "distilled": t[0], "original": t[1],
         "safety_distilled": float(d), "safety_original": float(o), "kept": bool(k), "distilled_tokens": a[0],
         "original_tokens": a[1]}
        for p, t, a, d, o, k in zip(prompts, texts, samples["answers"], distilled, original, keep)))
    write_jsonl(os.path.join(workdir, "distill.jsonl"),
                cd.distill_records([p.messages for p in prompts], [t[0] for t in texts], keep))
    metrics = cd.distill_metrics(distilled, original, keep)
    multihost_utils.sync_global_devices("context distillation samples")
    write_json(os.path.join(workdir, "distill.json"), metrics)  # written last: it marks the sampling as finished
    return metrics


def cd_task(rewards) -> Task:
    return Task("context_distill", check=check_fields, check_model=functools.partial(check_model, rewards=rewards),
                make_data=lambda config, tokenizer, raw: adversarial_prompts(config, tokenizer, load_table(config)),
                seq_len=False, init_from_required=True, lora=False, eval_tasks=False, writes_model=False)


def train(config, workdir: str, rewards: RewardCheckpoints | Rewards) -> TrainResult:
    """Distil with this safety RM ({"safety": ...}) and fine-tune; the summary has the distillation figures, the
    history the round's row, the product is WORKDIR/sft."""
    run = setup(config, workdir, cd_task(rewards))
    summary = {}

    def one_round(index: int) -> dict:
        del index
        metrics = read_json(os.path.join(workdir, "distill.json"))  # a rerun reuses finished samples
        metrics = metrics or distill(run, rewards.load(run.config, run.mesh, run.model_cfg))
        summary.update(metrics)
        print(f"kept {metrics['kept']} of {metrics['prompts']} ({metrics['kept_fraction']:.1%}); safety RM gain "
              f"(distilled - original): kept {metrics['safety_gain_kept_mean']:+.4f}, all "
              f"{metrics['safety_gain_all_mean']:+.4f}", flush=True)
        if not metrics["kept"]:
            raise ConfigError("no distilled answer scored above the original one: nothing to fine-tune on")
        rounds.fine_tune_round(config, init_from=config.init_from, data_path=os.path.join(workdir, "distill.jsonl"),
                               tokenizer_path=run.tokenizer.model_path, workdir=rounds.sft_dir(workdir),
                               seed=config.seed)
        return metrics

    result = rounds.run_rounds(run, 1, one_round)
    result.summary = summary or read_json(os.path.join(workdir, "distill.json"), {})
    result.product = rounds.sft_dir(workdir)
    return result


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """Context distillation with the safety RM of config.reward.safety_path."""
    return exit_if_interrupted(train(config, workdir, RewardCheckpoints()))


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "Context-distillation config (configs/cd_*.py).")
