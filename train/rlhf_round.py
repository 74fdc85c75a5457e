r"""One RLHF round's data and its measurements (paper section 3.2, Figure 1), two steps run by train.recipe:

    python -m train.rlhf_round --mode=pairs --round=K --out_dir=DIR/round_K/pairs --policy=LATEST \
        --prompts=FILE --gold_helpful=GOLD_RM [--gold_safety=...] --rm_helpful=RM --rm_safety=RM \
        [--previous=DIR/round_<K-1>/pairs]
  a fresh batch of prompts (the K-th slice of --num_prompts before the --eval_prompts held-out last ones), two answers
  each from the latest policy at two temperatures (section 3.2.1: "different temperature"), labelled by the annotator
  (the gold reward models: the synthetic setup of Gao et al. 2023; or --labels_dir, a `FileAnnotator` directory the
  user labels; a re-run after "labels pending" reuses the pairs.jsonl it sampled). Writes pairs.jsonl, labels.jsonl
  (this batch's preference pairs), preferences_all.jsonl (every
  label so far: the previous round's file + this batch, the reward models' training data, section 3.2.2) and
  round.json: the counts and each reward model's accuracy on this batch BEFORE it trains on it (Figure 6).

    python -m train.rlhf_round --mode=eval --round=K --out_dir=DIR/round_K/eval --policy=ROUND_K_POLICY \
        --sft_policy=SFT --prompts=FILE --gold_helpful=... --rm_helpful=ROUND_K_RM --rm_safety=ROUND_K_RM
  the round's policy on the --eval_prompts held-out prompts: mean proxy reward (the round's reward models, the ones it
  was optimised against), mean gold reward, and its win rate over the SFT policy judged by the annotator
  (ties = identical answers count a half). Writes round.json.

Both steps are one process each and write their outputs atomically at the end, so a kill re-runs the step.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from llama2_jax.checkpoints.params_io import load_params
from llama2_jax.data import preferences
from llama2_jax.data.prompts import encode_prompts, read_prompts
from llama2_jax.inference import reward_scores
from llama2_jax.rlhf import annotators, label_files, pairs
from llama2_jax.text.tokenizer import Tokenizer
from llama2_jax.training.outputs import read_json, write_json, write_jsonl

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", None, ["pairs", "eval"], "pairs: sample and label a round's batch; eval: the round's figures")
flags.DEFINE_integer("round", None, "The round (1-based): picks the fresh prompt slice and seeds the sampling.")
flags.DEFINE_string("out_dir", None, "Where the step writes its files.")
flags.DEFINE_string("policy", None, "The policy to sample (pairs: the latest; eval: the round's).")
flags.DEFINE_string("sft_policy", "", "eval: the SFT policy the win rate is measured against.")
flags.DEFINE_string("prompts", None, "Prompt file (any llama2_jax.data.prompts format, or a preference file).")
flags.DEFINE_integer("num_prompts", 16, "Prompts per round's batch.")
flags.DEFINE_integer("eval_prompts", 16, "Held-out prompts (the file's first ones; never in a round's batch).")
flags.DEFINE_integer("max_prompt_len", 96, "Prompts longer than this (tokens) are skipped.")
flags.DEFINE_integer("max_gen_len", 32, "Answer length limit (tokens).")
flags.DEFINE_multi_float("temperatures", list(pairs.PAIR_TEMPERATURES), "The two sampling temperatures of a pair.")
flags.DEFINE_float("eval_temperature", 0.7, "eval: the temperature of the held-out answers.")
flags.DEFINE_bool("keep_truncated", True, "Keep pairs with an answer cut at max_gen_len (a tiny policy seldom ends).")
flags.DEFINE_integer("batch_size", 8, "Rows per sampling / scoring call.")
flags.DEFINE_string("gold_helpful", "", "Gold helpfulness RM (the annotator).")
flags.DEFINE_string("gold_safety", "", "Gold safety RM (optional).")
flags.DEFINE_string("labels_dir", "", "A FileAnnotator directory instead of the gold RMs (human labels).")
flags.DEFINE_string("rm_helpful", "", "pairs: the helpfulness RM before this round; eval: the round's.")
flags.DEFINE_string("rm_safety", "", "pairs: the safety RM before this round; eval: the round's.")
flags.DEFINE_string("previous", "", "pairs: the previous round's pairs dir (its preferences_all.jsonl).")

ROUND_JSON, ALL_LABELS = "round.json", "preferences_all.jsonl"


def prompt_slices(path: str, tokenizer, max_prompt_len: int, eval_prompts: int, num_prompts: int, round_index: int):
    """(held-out prompts, round K's fresh batch): the last `eval_prompts` that fit (apart from the first ones, which
    rejection sampling and PPO take), and slice K - 1 of the others."""
    fitting = encode_prompts(tokenizer, read_prompts(path), max_prompt_len)[0]
    cut = len(fitting) - eval_prompts
    if cut < 1:
        raise ValueError(f"{path}: {len(fitting)} prompts fit in {max_prompt_len} tokens, not more than the "
                         f"{eval_prompts} held out")
    held_out, rest = fitting[cut:], fitting[:cut]
    batch = rest[(round_index - 1) * num_prompts:round_index * num_prompts]
    if num_prompts and not batch:
        raise ValueError(f"{path}: no fresh prompts left for round {round_index} ({len(rest)} after the "
                         f"{eval_prompts} held-out ones, {num_prompts} per round)")
    return held_out, batch


def scorer(path: str, tokenizer, batch_size: int):
    params, cfg = load_params(path, kind="score")
    return lambda dialogs: reward_scores.score(params, cfg, dialogs, tokenizer, batch_size=batch_size)


def annotator(tokenizer):
    if FLAGS.labels_dir:
        return label_files.FileAnnotator(FLAGS.labels_dir)
    if not (FLAGS.gold_helpful or FLAGS.gold_safety):
        raise ValueError("--gold_helpful/--gold_safety or --labels_dir: the round needs an annotator")
    return annotators.GoldRMAnnotator.from_checkpoints(tokenizer, FLAGS.gold_helpful or None,
                                                       FLAGS.gold_safety or None, batch_size=FLAGS.batch_size)


def sampler(path: str, tokenizer):
    params, cfg = load_params(path)
    return pairs.policy_sampler(params, cfg, tokenizer, max_gen_len=FLAGS.max_gen_len, batch_size=FLAGS.batch_size)


def rm_accuracy(score_fn, batch: list[preferences.PreferencePair]) -> float:
    """Fraction of pairs whose chosen answer the RM scores higher (Figure 6); ties count a half."""
    chosen = np.asarray(score_fn([p.prompt + [{"role": "assistant", "content": p.chosen}] for p in batch]))
    rejected = np.asarray(score_fn([p.prompt + [{"role": "assistant", "content": p.rejected}] for p in batch]))
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def run_pairs(tokenizer) -> dict:
    _, batch = prompt_slices(FLAGS.prompts, tokenizer, FLAGS.max_prompt_len, FLAGS.eval_prompts, FLAGS.num_prompts,
                             FLAGS.round)
    pairs_path = os.path.join(FLAGS.out_dir, "pairs.jsonl")
    if os.path.isfile(pairs_path):  # sampled by an earlier run that stopped for labels: the same pairs, not new ones
        batch_pairs, stats = list(label_files.read_exported(pairs_path).values()), pairs.PairStats(len(batch))
        stats.pairs = len(batch_pairs)
    else:
        variants = pairs.same_model(sampler(FLAGS.policy, tokenizer), tuple(FLAGS.temperatures))
        batch_pairs, stats = pairs.sample_pairs(batch, variants, tag=f"round_{FLAGS.round}", seed=FLAGS.round,
                                                keep_truncated=FLAGS.keep_truncated)
        write_jsonl(pairs_path, (label_files.pair_record(p) for p in batch_pairs))
    print(f"round {FLAGS.round}: {stats.summary()}", flush=True)
    labelled = annotators.preference_pairs(batch_pairs, annotator(tokenizer).label(batch_pairs))
    earlier = []
    if FLAGS.previous:
        earlier = preferences.read_preferences(os.path.join(FLAGS.previous, ALL_LABELS))[0]
    record = {"round": FLAGS.round, "prompts": len(batch), "pairs": len(batch_pairs), "new_labels": len(labelled),
              "earlier_labels": len(earlier), "all_labels": len(earlier) + len(labelled),
              "dropped_identical": stats.identical, "dropped_truncated": stats.truncated}
    for name, path in (("helpful", FLAGS.rm_helpful), ("safety", FLAGS.rm_safety)):
        if path and labelled:
            record[f"rm_{name}_accuracy_before"] = rm_accuracy(scorer(path, tokenizer, FLAGS.batch_size), labelled)
    preferences.write_preferences(os.path.join(FLAGS.out_dir, "labels.jsonl"), labelled)
    preferences.write_preferences(os.path.join(FLAGS.out_dir, ALL_LABELS), earlier + labelled)
    return record


def run_eval(tokenizer) -> dict:
    held_out, _ = prompt_slices(FLAGS.prompts, tokenizer, FLAGS.max_prompt_len, FLAGS.eval_prompts, 0, 0)
    rounds_answers = sampler(FLAGS.policy, tokenizer)(held_out, FLAGS.eval_temperature, 10_000 + FLAGS.round)
    dialogs = [p.messages + [{"role": "assistant", "content": a.text}] for p, a in zip(held_out, rounds_answers)]
    record = {"round": FLAGS.round, "eval_prompts": len(held_out)}
    for name, path in (("helpful", FLAGS.rm_helpful), ("safety", FLAGS.rm_safety)):
        if path:
            record[f"proxy_{name}_mean"] = float(np.mean(scorer(path, tokenizer, FLAGS.batch_size)(dialogs)))
    judge = annotator(tokenizer)
    if isinstance(judge, annotators.GoldRMAnnotator):
        for name, values in judge.scores(dialogs).items():
            record[f"gold_{name}_mean"] = float(np.mean(values))
    if FLAGS.sft_policy:
        sft_answers = sampler(FLAGS.sft_policy, tokenizer)(held_out, FLAGS.eval_temperature, 10_000 + FLAGS.round)
        comparisons = [annotators.ComparisonPair(annotators.make_pair_id(p.messages, a.text, b.text, "win"),
                                                 p.messages, a.text, b.text, p.is_safety)
                       for p, a, b in zip(held_out, rounds_answers, sft_answers) if a.text != b.text]
        ties = len(held_out) - len(comparisons)
        wins = sum(label.preferred == "a" for label in judge.label(comparisons)) if comparisons else 0
        record["win_rate_vs_sft"] = (wins + 0.5 * ties) / len(held_out)
    return record


def main(argv) -> None:
    del argv
    for name in ("mode", "round", "out_dir", "policy", "prompts"):
        if getattr(FLAGS, name) is None:
            sys.exit(f"error: --{name} is required")
    path = os.path.join(FLAGS.out_dir, ROUND_JSON)
    if read_json(path, {}).get("round") == FLAGS.round:
        print(f"{path} exists: round {FLAGS.round} {FLAGS.mode} done earlier")
        return
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    tokenizer = Tokenizer(os.path.join(FLAGS.policy, "tokenizer.model"))
    try:
        record = run_pairs(tokenizer) if FLAGS.mode == "pairs" else run_eval(tokenizer)
    except (ValueError, label_files.LabelsPending) as error:
        sys.exit(f"error: {str(error).splitlines()[0]}")
    write_json(path, record)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)


if __name__ == "__main__":
    app.run(main)
