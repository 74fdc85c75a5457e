r"""Safety context distillation (paper section 4.2.4): `python -m train.context_distill --config=configs/cd_tiny.py
    --workdir=DIR --config.init_from=POLICY --config.reward.safety_path=RM --config.prompts.path=PROMPTS`.

  1. the adversarial prompts of config.prompts (those tagged is_safety; `--config.prompts.is_safety=True` tags a
     whole untagged file such as HH harmless) are answered twice by the policy, in one compiled sample+score call:
     with a safety preprompt (the prompt's risk-category preprompt with its answer template when the prompt has a
     `risk_category` and `distill.use_categories`, else a generic one; texts in llama2_jax/data/safety_preprompts.json
     or `distill.preprompts_path`) and without it;
  2. the safety RM scores both answers after the prompt *without* the preprompt (the context the model will be trained
     in); the distilled answer is kept only when it scores above the original one (targeted context distillation,
     `llama2_jax.rlhf.context_distill`);
  3. the kept (prompt without preprompt, distilled answer) pairs are an SFT dataset (loss on the answer only), and the
     policy is fine-tuned on it with the SFT trainer's run (`common.fine_tune`, config.sft).

Outputs: WORKDIR/samples.jsonl (both answers and scores per prompt), WORKDIR/distill.jsonl (the SFT data),
WORKDIR/distill.json (kept fraction, mean safety-RM gain of kept vs all), WORKDIR/sft/ (the distilled policy: an
init_from). A re-run reuses finished samples (WORKDIR/distill.json) and the SFT trainer resumes from its checkpoints.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llama2_jax.checkpoints import params_io as param_checkpoint
from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data import safety_preprompts
from llama2_jax.inference import decode, generate
from llama2_jax.model import sharding as sh
from llama2_jax.model.llama import abstract_params
from llama2_jax.rlhf import context_distill as cd
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.text import chat_format as chat
from llama2_jax.training import common


def check_config(config, mesh) -> None:
    """One-line ConfigErrors for the distillation fields, before anything is loaded or compiled."""
    s = config.sampling
    if not config.reward.safety_path:
        raise common.ConfigError("config.reward.safety_path is empty: context distillation keeps answers by the "
                                 "safety RM's score")
    if s.max_gen_len < 1 or s.temperature < 0 or not 0 < s.top_p <= 1:
        raise common.ConfigError(f"config.sampling: max_gen_len {s.max_gen_len} must be >= 1, temperature "
                                 f"{s.temperature} >= 0 and top_p {s.top_p} in (0, 1]")
    if s.batch_size < 2 or s.batch_size % 2 or s.batch_size % sh.data_parallel_size(mesh):
        raise common.ConfigError(f"config.sampling.batch_size ({s.batch_size}) must be even (two rows per prompt) "
                                 f"and a multiple of the data-parallel size {sh.data_parallel_size(mesh)}")


def load_table(config) -> safety_preprompts.PrepromptTable:
    try:
        return safety_preprompts.load_table(config.distill.preprompts_path or None)
    except (ValueError, OSError) as error:
        raise common.ConfigError(f"config.distill.preprompts_path: {error}") from None


def adversarial_prompts(config, tokenizer, table) -> tuple[list, list[list[int]], list[list[int]]]:
    """(prompts, encodings with the preprompt, encodings without) of the safety-tagged prompts whose preprompted
    encoding fits in max_prompt_len (the others are dropped and counted)."""
    prompts, _ = common.load_prompts(config, tokenizer)
    adversarial = [p for p in prompts if p.is_safety]
    if not adversarial:
        raise common.ConfigError(f"config.prompts: none of the {len(prompts)} prompts is tagged is_safety (pass "
                                 "--config.prompts.is_safety=True for a file of adversarial prompts)")
    kept, with_pre, without = [], [], []
    for i, prompt in enumerate(adversarial):
        try:
            preprompt = table.preprompt_for(i, prompt.risk_category, use_categories=config.distill.use_categories)
        except ValueError as error:
            raise common.ConfigError(f"config.prompts: prompt {i}: {error}") from None
        tokens = chat.encode_dialog(tokenizer, cd.with_preprompt(prompt.messages, preprompt))
        if len(tokens) <= config.prompts.max_prompt_len:
            kept.append(prompt)
            with_pre.append(tokens)
            without.append(chat.encode_dialog(tokenizer, prompt.messages))
    if not kept:
        raise common.ConfigError(f"config.prompts.max_prompt_len ({config.prompts.max_prompt_len}) is shorter than "
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
    answers = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, max_gen_len))(
        out["tokens"], prompt_lens)  # [B, max_gen_len]: the generated tokens
    answers = jnp.where(jnp.arange(max_gen_len)[None, :] < out["lengths"][:, None], answers, generate.META_PAD_ID)
    room = jnp.full_like(answers, generate.META_PAD_ID)
    placed = jax.vmap(lambda row, answer, start: jax.lax.dynamic_update_slice_in_dim(row, answer, start, 0))(
        jnp.concatenate([score_tokens, room], axis=1), answers, score_lens)  # context + answer [B, P + max_gen_len]
    ids, lengths = rlhf.scoring_sequences(placed, score_lens, out["lengths"], eos_id)
    return {"answers": answers, "lengths": out["lengths"], "safety": safety_fn(safety_params, ids, lengths)}


def sample_both(config, sampler, params, safety_params, with_pre, without, mesh) -> dict[str, list]:
    """Per prompt: the answer with the preprompt and the one without (token lists) and their safety scores."""
    rows, width = config.sampling.batch_size, config.prompts.max_prompt_len
    order = [(p, variant) for p in range(len(without)) for variant in (0, 1)]  # 0: with the preprompt, 1: without
    answers, scores = [[None, None] for _ in without], np.zeros((len(without), 2), np.float32)
    rng = jax.random.PRNGKey(config.seed)
    to_global = functools.partial(common.host_to_global, mesh=mesh)
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        padded = chunk + [chunk[0]] * (rows - len(chunk))
        sample_in = [(with_pre if v == 0 else without)[p] for p, v in padded]
        tokens, lens = generate.pad_prompts(sample_in, generate.META_PAD_ID, width, bucket=width)
        context, context_lens = generate.pad_prompts([without[p] for p, _ in padded], generate.META_PAD_ID, width,
                                                     bucket=width)
        out = common.to_host(sampler(params, safety_params, *map(to_global, (tokens, lens, context, context_lens)),
                                     jax.random.fold_in(rng, start)))
        for row, (p, v) in enumerate(chunk):
            answers[p][v] = out["answers"][row, :out["lengths"][row]].tolist()
            scores[p, v] = out["safety"][row]
    return {"answers": answers, "scores": scores}


def write_jsonl(path: str, records) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)


def distill(config, workdir: str, tokenizer, cfg, mesh, score_fns, reward_params) -> dict:
    """Sample, score, keep and write WORKDIR/samples.jsonl, distill.jsonl and distill.json; returns the metrics."""
    table = load_table(config)
    prompts, with_pre, without = adversarial_prompts(config, tokenizer, table)
    if score_fns is None:
        score_fns, reward_params = common.load_reward_models(config, mesh, cfg.vocab_size)
    s = config.sampling
    sampler = jax.jit(functools.partial(
        sample_and_score, cfg=cfg, safety_fn=score_fns["safety"], max_gen_len=s.max_gen_len, temperature=s.temperature,
        top_p=s.top_p, eos_id=tokenizer.eos_id, mesh=mesh), compiler_options=decode.DECODE_COMPILER_OPTIONS)
    shardings = sh.tree_shardings(abstract_params(cfg, boxed=True), mesh)
    params, _ = param_checkpoint.load_params(config.init_from, cfg, shardings=shardings)
    samples = sample_both(config, sampler, params, reward_params["safety"], with_pre, without, mesh)
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
    if jax.process_index() == 0:  # written last: its presence marks the sampling as finished
        with open(os.path.join(workdir, "distill.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def train_and_evaluate(config, workdir: str, score_fns=None, reward_params=None) -> dict:
    """Distil and fine-tune; returns the distillation metrics and the SFT history.

    score_fns / reward_params: a stand-in safety RM ({"safety": fn(params, tokens, lengths) -> sigmoid scores})
    instead of config.reward.safety_path's checkpoint (tests)."""
    mesh = common.make_mesh(config)
    if score_fns is None:
        check_config(config, mesh)
    cfg = common.resolve_model_config(config, required=True)
    if config.prompts.max_prompt_len + config.sampling.max_gen_len > cfg.max_seq_len:
        raise common.ConfigError(f"config.prompts.max_prompt_len + config.sampling.max_gen_len exceeds the policy's "
                                 f"max_seq_len {cfg.max_seq_len}")
    common.check_workdir(workdir, cfg, init_from=config.init_from)
    tokenizer = common.load_tokenizer(config, cfg.vocab_size)
    os.makedirs(workdir, exist_ok=True)
    summary = os.path.join(workdir, "distill.json")
    if os.path.isfile(summary):  # resume: the samples are done
        with open(summary) as f:
            metrics = json.load(f)
    else:
        metrics = distill(config, workdir, tokenizer, cfg, mesh, score_fns, reward_params)
    print(f"kept {metrics['kept']} of {metrics['prompts']} ({metrics['kept_fraction']:.1%}); safety RM gain "
          f"(distilled - original): kept {metrics['safety_gain_kept_mean']:+.4f}, all "
          f"{metrics['safety_gain_all_mean']:+.4f}", flush=True)
    if not metrics["kept"]:
        raise common.ConfigError("no distilled answer scored above the original one: nothing to fine-tune on")
    sft = config.sft.copy_and_resolve_references()
    sft.init_from, sft.data.path, sft.tokenizer.path = config.init_from, os.path.join(workdir, "distill.jsonl"), \
        tokenizer.model_path
    sft.mesh, sft.seed = config.mesh, config.seed
    tuned = common.fine_tune(sft, os.path.join(workdir, "sft"))
    return {**metrics, "sft_history": tuned.history}


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "Context-distillation config (configs/cd_*.py).")
