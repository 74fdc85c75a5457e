"""Annotators (paper section 3.2.1): the gold-RM annotator's rating thresholds and safety labels, the file annotator's
export -> label -> import round trip and its refusals, verdicts -> reward-model pairs, and the pair sampling of a
round (two answers per prompt from two variants).

Covers llama2_jax.rlhf.annotators, llama2_jax.rlhf.label_files and llama2_jax.rlhf.pairs."""

import json
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import random_llama_params

from llama2_jax.checkpoints.params_io import load_params
from llama2_jax.data import preferences
from llama2_jax.data import rm as rm_data
from llama2_jax.data.prompts import Prompt
from llama2_jax.inference import generate, reward_scores
from llama2_jax.model import score as score_model
from llama2_jax.model.config import LlamaConfig
from llama2_jax.rlhf import annotators
from llama2_jax.rlhf import pairs as pair_sampling
from llama2_jax.rlhf.annotators import ComparisonPair, GoldRMAnnotator, Label
from llama2_jax.rlhf.label_files import FileAnnotator, LabelsPending
from llama2_jax.text import chat_format as chat
from llama2_jax.text.tokenizer import Tokenizer


def make_pair(i, a="yes", b="no", is_safety=False):
    prompt = [{"role": "user", "content": f"question {i}"}]
    return ComparisonPair(annotators.make_pair_id(prompt, a, b, "r1"), prompt, a, b, is_safety)


# ----------------------------------------------------------------------------------------------------------------------
# Gold reward models


def test_rating_thresholds_are_the_large_margins_on_the_sigmoid_scale():
    np.testing.assert_allclose(annotators.RATING_GAP_THRESHOLDS, [0.6351489, 0.4621172, 0.2449187], atol=1e-6)
    gaps = [0.9, 0.64, annotators.RATING_GAP_THRESHOLDS[0], 0.6, 0.47, 0.3, 0.245, 0.2, 0.01, 0.0, -0.5]
    assert annotators.rating_for_gap(gaps) == [
        "significantly_better", "significantly_better", "significantly_better", "better", "better", "slightly_better",
        "slightly_better", "negligibly_better", "negligibly_better", "negligibly_better", "better"]
    # The property the thresholds are chosen for: a sigmoid gap >= tanh(m / 4) implies a logit gap >= m.
    logits = np.linspace(-12, 12, 481)
    x_a, x_b = np.meshgrid(logits, logits)
    sigmoid_gap = 1 / (1 + np.exp(-x_a)) - 1 / (1 + np.exp(-x_b))
    for margin, threshold in zip((3, 2, 1), annotators.RATING_GAP_THRESHOLDS):
        assert np.all((x_a - x_b)[sigmoid_gap >= threshold] >= margin - 1e-9)
        assert np.any(sigmoid_gap >= threshold)
    custom = annotators.rating_for_gap([0.5, 0.1], thresholds=(0.4, 0.2, 0.05))
    assert custom == ["significantly_better", "slightly_better"]
    for bad in ((0.2, 0.4, 0.1), (0.5, 0.3), (1.5, 0.3, 0.1), (0.5, 0.3, 0.0)):
        with pytest.raises(ValueError, match="strictly decreasing sigmoid-score gaps"):
            annotators.rating_for_gap([0.1], thresholds=bad)


def test_labels_from_scores_pick_the_model_by_prompt_and_label_safety_at_0_15():
    pairs = [make_pair(0), make_pair(1, is_safety=True), make_pair(2), make_pair(3, is_safety=True)]
    helpful = ([0.8, 0.9, 0.40, 0.5], [0.3, 0.1, 0.45, 0.5])
    safety = ([0.9, 0.10, 0.2, 0.16], [0.1, 0.80, 0.9, 0.15])
    labels = annotators.labels_from_scores(pairs, helpful, safety)
    # pair 0: helpful prompt, helpful gap 0.5 -> a, better; no safety labels on a helpfulness prompt
    # pair 1: safety prompt, safety gap -0.7 -> b, significantly better; a unsafe (0.10 < 0.15), b safe
    # pair 2: helpful gap -0.05 -> b, negligibly (the safety scores are not used on a helpfulness prompt)
    # pair 3: safety gap 0.01 -> a, negligibly; 0.15 itself is safe (unsafe means < 0.15)
    assert [(l.preferred, l.rating, l.safe_a, l.safe_b) for l in labels] == [
        ("a", "better", None, None), ("b", "significantly_better", False, True),
        ("b", "negligibly_better", None, None), ("a", "negligibly_better", True, True)]
    assert [l.pair_id for l in labels] == [p.pair_id for p in pairs]
    tie = annotators.labels_from_scores([make_pair(4)], ([0.3], [0.3]))[0]
    assert (tie.preferred, tie.rating) == ("a", "negligibly_better")
    only_safety = annotators.labels_from_scores(pairs[:1], None, ([0.2], [0.7]))[0]  # no helpful RM: safety decides
    assert (only_safety.preferred, only_safety.safe_a) == ("b", None)
    with pytest.raises(ValueError, match=r"helpful scores have shapes \(3,\) and \(4,\), expected \(4,\)"):
        annotators.labels_from_scores(pairs, ([0.1] * 3, [0.2] * 4))


def test_gold_annotator_scores_both_answers_with_each_model():
    table = {"good": 0.9, "fine": 0.5, "bad": 0.05}
    calls = []

    def scorer(dialogs):
        calls.append(len(dialogs))
        return np.array([table[d[-1]["content"]] for d in dialogs])

    gold = GoldRMAnnotator(helpful=scorer, safety=lambda dialogs: 1.0 - scorer(dialogs))
    pairs = [make_pair(0, "bad", "good"), make_pair(1, "fine", "bad", is_safety=True)]
    labels = gold.label(pairs)
    assert calls == [4, 4]  # one call per model for all answers
    # pair 0 on helpfulness: 0.05 vs 0.9 -> b by 0.85; pair 1 on safety: 0.5 vs 0.95 -> b by 0.45, both safe
    assert [(l.preferred, l.rating, l.safe_a, l.safe_b) for l in labels] == [
        ("b", "significantly_better", None, None), ("b", "slightly_better", True, True)]
    assert gold.label([]) == []
    np.testing.assert_allclose(gold.scores([pairs[0].dialogs()[1]])["helpful"], [0.9])
    with pytest.raises(ValueError, match="returned 1 scores for 4 dialogs"):
        GoldRMAnnotator(helpful=lambda d: np.array([0.5])).label(pairs)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]: expected sigmoid scores"):
        GoldRMAnnotator(helpful=lambda d: np.full(len(d), 2.0)).label(pairs)
    with pytest.raises(ValueError, match="needs a helpfulness or a safety reward model"):
        GoldRMAnnotator()


def test_verdicts_become_collected_pairs_and_the_mixes_drop_chosen_unsafe_ones():
    pairs = [make_pair(0, is_safety=True), make_pair(1, is_safety=True), make_pair(2, "same", "same")]
    labels = [Label(pairs[0].pair_id, "b", "Slightly better", safe_a=True, safe_b=False),
              Label(pairs[1].pair_id, "a", "unsure", safe_a=True, safe_b=False), Label(pairs[2].pair_id, "a", "better")]
    out = annotators.preference_pairs(pairs, labels)
    assert len(out) == 2  # identical answers carry no preference
    assert (out[0].chosen, out[0].rejected, out[0].rating) == ("no", "yes", "slightly_better")
    assert (out[0].chosen_safe, out[0].rejected_safe, out[0].origin) == (False, True, "collected")
    assert out[0].chosen_unsafe_other_safe and not out[1].chosen_unsafe_other_safe
    assert out[1].rating == "negligibly_better"
    helpful = preferences.PreferencePair([{"role": "user", "content": "h"}], "help", "meh", origin="collected")
    expected = {"helpful": ["help", "yes"], "safety": ["yes"], "none": ["yes", "help"]}
    for mix, chosen in expected.items():  # the chosen-unsafe pair ("no" chosen) never reaches a model
        assert [p.chosen for p in rm_data.apply_mix(mix, out + [helpful], seed=0)] == chosen, mix
    with pytest.raises(ValueError, match="1 of 3 pairs have no label"):
        annotators.preference_pairs(pairs, labels[:2])


# ----------------------------------------------------------------------------------------------------------------------
# File annotator


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_file_annotator_round_trip_resumes_and_keeps_imported_labels(tmp_path):
    annotator = FileAnnotator(tmp_path / "ann")
    batch = [make_pair(0), make_pair(1, is_safety=True), make_pair(2)]
    with pytest.raises(LabelsPending, match=r"^3 of 3 pairs have no label yet: fill in .*pending.jsonl"):
        annotator.label(batch)
    pending = read_jsonl(annotator.pending_path)
    assert [r["pair_id"] for r in pending] == [p.pair_id for p in batch]
    assert pending[1]["is_safety"] and pending[1]["preferred"] is None and pending[1]["answer_a"] == "yes"
    assert annotator.export(batch) == 0  # exporting again is a no-op

    # label two of them (the filled-in pending file), one left for later
    pending[0].update(preferred="b", rating="better")
    pending[1].update(preferred="a", rating="significantly better", safe_a=True, safe_b=False)
    write_lines(tmp_path / "ann" / "labels.jsonl", pending)
    with pytest.raises(LabelsPending, match=r"^1 of 3 pairs"):
        annotator.label(batch)
    assert [r["pair_id"] for r in read_jsonl(annotator.pending_path)] == [batch[2].pair_id]

    # a later labels file with only the last label: the earlier ones are kept
    write_lines(tmp_path / "ann" / "labels.jsonl", [{"pair_id": batch[2].pair_id, "preferred": "a",
                                                     "rating": "negligibly-better"}])
    labels = annotator.label(batch)
    assert [(l.preferred, l.rating, l.safe_a, l.safe_b) for l in labels] == [
        ("b", "better", None, None), ("a", "significantly_better", True, False), ("a", "negligibly_better", None, None)]
    assert FileAnnotator(tmp_path / "ann").label(batch) == labels  # persisted: a new process sees them
    assert FileAnnotator(tmp_path / "ann").import_labels() == 0  # importing the same file again adds nothing
    sources = [r["source"] for r in read_jsonl(annotator.imported_path)]
    assert sources[0].endswith("labels.jsonl:1") and sources[2].endswith("labels.jsonl:1")

    # a second batch in the same directory: only its own pairs are pending
    second = [make_pair(3)]
    with pytest.raises(LabelsPending, match=r"^1 of 1 pairs"):
        annotator.label(second)
    assert [p.pair_id for p in annotator.pending()] == [second[0].pair_id]


def test_file_annotator_refuses_labels_it_cannot_trust_with_the_file_and_line(tmp_path):
    annotator = FileAnnotator(tmp_path)
    batch = [make_pair(0), make_pair(1)]
    annotator.export(batch)
    labels = tmp_path / "mine.jsonl"
    good = {"pair_id": batch[0].pair_id, "preferred": "a", "rating": "better"}
    cases = [
        ({"pair_id": "r1-0000000000000000", "preferred": "a", "rating": "better"},
         r"mine.jsonl:2: pair_id 'r1-0000000000000000' was not exported \(not in .*exported.jsonl\)$"),
        ({"pair_id": batch[1].pair_id, "prefered": "a", "rating": "better"},
         r"mine.jsonl:2: unknown field\(s\) 'prefered'"),
        ({"pair_id": batch[1].pair_id, "preferred": "c", "rating": "better"}, r"mine.jsonl:2: 'preferred' is 'c'"),
        ({"pair_id": batch[1].pair_id, "preferred": "a", "rating": "much better"},
         r"mine.jsonl:2: rating 'much better'"),
        ({"pair_id": batch[1].pair_id, "preferred": "a"}, r"mine.jsonl:2: 'rating' is missing"),
        ({"pair_id": batch[1].pair_id, "preferred": "a", "rating": "better", "answer_b": "changed"},
         r"mine.jsonl:2: 'answer_b' differs from the exported pair"),
        ({"pair_id": batch[1].pair_id, "rating": "better"}, r"mine.jsonl:2: a label without 'preferred'"),
        ({**good, "preferred": "b"}, r"mine.jsonl:2: pair .* is labelled differently at .*mine.jsonl:1"),
    ]
    for bad, message in cases:
        write_lines(labels, [good, bad])
        with pytest.raises(ValueError, match=message) as error:
            annotator.import_labels(labels)
        assert "\n" not in str(error.value)
        assert annotator.imported() == {}  # a file is imported whole or not at all
    write_lines(labels, [good])
    assert annotator.import_labels(labels) == 1
    write_lines(labels, [{**good, "rating": "slightly better"}])
    with pytest.raises(ValueError, match=r"mine.jsonl:1: the label of pair .* differs from the one imported from "
                                         r".*mine.jsonl:1; edit .*imported.jsonl"):
        annotator.import_labels(labels)
    other = ComparisonPair(batch[0].pair_id, batch[0].prompt, "yes", "changed")
    with pytest.raises(ValueError, match="was exported to .* with other content"):
        annotator.export([other])


# ----------------------------------------------------------------------------------------------------------------------
# Pairs of a round


def test_sample_pairs_draws_one_answer_per_variant_and_drops_identical_and_truncated():
    prompts = [Prompt([{"role": "user", "content": f"q{i}"}], is_safety=i == 1) for i in range(6)]
    calls = []

    def sampler(batch, temperature, seed):
        calls.append((len(batch), temperature, seed))
        out = [pair_sampling.Sample(f"{p.messages[0]['content']} at {temperature}") for p in batch]
        if temperature == 1.0:
            out[2] = pair_sampling.Sample("q2 at 0.6")  # the same text as the other variant: no preference
            out[3] = pair_sampling.Sample("q3 cut", truncated=True)
        return out

    variants = pair_sampling.same_model(sampler)
    pairs, stats = pair_sampling.sample_pairs(prompts, variants, tag="round_1", seed=7)
    assert calls == [(6, 0.6, 7), (6, 1.0, 8)]
    assert (stats.prompts, stats.pairs, stats.identical, stats.truncated) == (6, 4, 1, 1)
    assert [p.meta["prompt_index"] for p in pairs] == [0, 1, 4, 5] and pairs[1].is_safety
    for pair in pairs:
        i = pair.meta["prompt_index"]
        by_side = {pair.meta["temperature_a"]: pair.answer_a, pair.meta["temperature_b"]: pair.answer_b}
        assert by_side == {0.6: f"q{i} at 0.6", 1.0: f"q{i} at 1.0"}
        assert pair.pair_id.startswith("round_1-") and pair.prompt == prompts[i].messages
    assert {p.meta["variant_a"] for p in pairs} == {"policy@T=0.6", "policy@T=1"}  # the a/b order is drawn per pair
    again, _ = pair_sampling.sample_pairs(prompts, variants, tag="round_1", seed=7)
    assert [p.pair_id for p in again] == [p.pair_id for p in pairs]  # stable ids
    kept, stats = pair_sampling.sample_pairs(prompts, variants, tag="round_1", seed=7, keep_truncated=True)
    assert stats.pairs == 5 and any(p.meta["truncated_a"] or p.meta["truncated_b"] for p in kept)
    with pytest.raises(ValueError, match="returned 5 answers for 6 prompts"):
        pair_sampling.sample_pairs(prompts, [pair_sampling.Variant("x", lambda b, t, s: [None] * 5, 1.0)] * 2,
                                   tag="r", seed=0)


def test_preference_files_round_trip_with_origin_and_labels(tmp_path):
    pair = preferences.PreferencePair([{"role": "user", "content": "q"}], "a", "b", "better", True, True, False,
                                      "collected")
    path = tmp_path / "pairs.jsonl"
    unlabelled = preferences.PreferencePair([{"role": "user", "content": "r"}], "c", "d")
    preferences.write_preferences(path, [pair, unlabelled])
    read, _ = preferences.read_preferences(path)
    assert read[0] == pair and read[1].origin is None
    assert [p.origin for p in preferences.read_preferences(path, origin="open_source")[0]] == ["open_source"] * 2
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "origin": "meta"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: 'origin' is 'meta', expected one of collected, open_source"):
        preferences.read_preferences(path)
    assert math.isclose(annotators.RATING_GAP_THRESHOLDS[2], math.tanh(0.25))


def test_gold_annotator_from_reward_model_checkpoints_scores_like_reward_scores(tmp_path, llama_tokenizer_path):
    cfg = LlamaConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                      dtype="float32")
    tokenizer = Tokenizer(llama_tokenizer_path)
    dirs = []
    for seed in (1, 2):  # a random helpfulness and a random safety reward model, in train.reward's layout
        params = score_model.init_score_params_from_llama(random_llama_params(cfg, seed), jax.random.PRNGKey(seed), 1.0)
        with ocp.StandardCheckpointer() as saver:
            saver.save((tmp_path / f"rm{seed}" / "params").absolute(), jax.device_get(params))
        (tmp_path / f"rm{seed}" / "llama_config.json").write_text(json.dumps(cfg.to_dict()))
        dirs.append(tmp_path / f"rm{seed}")
    gold = GoldRMAnnotator.from_checkpoints(tokenizer, dirs[0], dirs[1], batch_size=4)
    pairs = [make_pair(0, "Sure, here it is.", "No."), make_pair(1, "I can't help with that.", "Here is how.", True),
             make_pair(2, "Paris.", "London is the capital of France.")]
    dialogs = [d for pair in pairs for d in pair.dialogs()]
    expected = {}
    for name, path in zip(("helpful", "safety"), dirs):
        params, loaded_cfg = load_params(path, kind="score")
        values = reward_scores.score(params, loaded_cfg, dialogs, tokenizer, batch_size=4)
        expected[name] = (values[0::2], values[1::2])
    assert gold.label(pairs) == annotators.labels_from_scores(pairs, expected["helpful"], expected["safety"])


def test_policy_sampler_decodes_the_sampled_answers_and_their_truncation(llama_tokenizer_path):
    cfg = LlamaConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                      dtype="float32")
    params, tokenizer = random_llama_params(cfg, 0), Tokenizer(llama_tokenizer_path)
    prompts = [Prompt([{"role": "user", "content": f"Say {i}"}]) for i in range(5)]
    sampler = pair_sampling.policy_sampler(params, cfg, tokenizer, max_gen_len=6, batch_size=4)
    answers = sampler(prompts, 1.0, 3)
    assert len(answers) == 5
    encoded = [chat.encode_dialog(tokenizer, p.messages) for p in prompts[4:]] * 4  # the last batch, filled up
    direct = generate.sample_lists(params, cfg, encoded, max_gen_len=6, temperature=1.0, top_p=0.9,
                                   eos_id=tokenizer.eos_id, rng=jax.random.fold_in(jax.random.PRNGKey(3), 4))
    start, length = int(direct["prompt_lens"][0]), int(direct["lengths"][0])
    assert answers[4].text == tokenizer.decode(direct["tokens"][0, start:start + length].tolist())
    assert answers[4].truncated == bool(direct["truncated"][0]) == (length == 6)
