"""Answers cut at max_gen_len are marked truncated (decode.truncated_rows, decode.sample's "truncated"), and the
rejection-sampling pool across iterations (rlhf.pool, paper section 3.2.3) keeps the best complete answer per prompt
across rounds, saves, loads and rescores.

Covers llama2_jax.rlhf.pool."""

import json

import jax
import numpy as np
import pytest
from conftest import random_llama_params

from llama2_jax.data.prompts import Prompt
from llama2_jax.inference import decode, generate
from llama2_jax.model.config import LlamaConfig
from llama2_jax.rlhf import pool as answer_pool

EOS, PAD = 2, -1


def test_truncated_rows_on_hand_made_token_arrays():
    # buffer S = 8; max_gen_len = 4. Rows: prompt tokens (5, 6, ...), answer tokens (7, 8, 9, ...), EOS = 2, pad -1.
    tokens = np.array([
        [5, 6, 7, 8, 2, PAD, PAD, PAD],  # 2 answer tokens, then EOS: complete
        [5, 6, 7, 8, 9, 9, PAD, PAD],  # 4 answer tokens = max_gen_len, no EOS: truncated
        [5, 6, 2, PAD, PAD, PAD, PAD, PAD],  # EOS at once: an empty but complete answer
        [5, 6, 7, 8, 9, 2, PAD, PAD],  # 3 tokens, EOS as the 4th generated token: complete
        [5, 6, 7, 8, 9, 9, 2, PAD],  # 4 tokens and an EOS after the limit (a longer run's buffer): truncated
        [5, 6, 5, 6, 5, 7, 8, 9],  # a 5-token prompt and 3 answer tokens fill the buffer before max_gen_len: truncated
        [5, 6, 5, 6, 7, 8, 9, 2],  # the same prompt width, EOS in the buffer's last slot: complete
    ])
    prompt_lens = np.array([2, 2, 2, 2, 2, 5, 4])
    lengths = np.array([2, 4, 0, 3, 4, 3, 3])
    expected = [False, True, False, False, True, True, False]
    np.testing.assert_array_equal(decode.truncated_rows(tokens, prompt_lens, lengths, 4, EOS), expected)
    jitted = jax.jit(decode.truncated_rows, static_argnums=(3, 4))
    np.testing.assert_array_equal(jitted(tokens, prompt_lens, lengths, 4, EOS), expected)


def test_sampler_output_marks_truncated_answers():
    cfg = LlamaConfig(vocab_size=8, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=32,
                      dtype="float32")  # 8 tokens: EOS is drawn often, so both cases occur
    params = random_llama_params(cfg, seed=0, std=0.3)
    prompts = [[1, 3, 4], [1, 5], [1, 6, 7, 3], [1, 4]] * 4
    out = generate.sample_lists(params, cfg, prompts, max_gen_len=6, temperature=1.0, rng=0, bucket=8)
    np.testing.assert_array_equal(out["truncated"], ~out["done"])
    assert out["truncated"].any() and not out["truncated"].all()
    np.testing.assert_array_equal(out["lengths"][out["truncated"]], 6)  # cut exactly at max_gen_len
    assert np.all(out["lengths"][~out["truncated"]] < 6)


def test_best_answers_skip_truncated_answers():
    rewards = np.array([[0.9, 0.2, 0.5], [0.1, 0.4, 0.3], [0.7, 0.8, 0.9]])
    truncated = np.array([[True, False, False], [False, False, False], [True, True, True]])
    np.testing.assert_array_equal(answer_pool.best_answers(rewards, truncated), [2, 1, -1])
    np.testing.assert_array_equal(answer_pool.best_answers(rewards, truncated, keep_truncated=True), [2, 1, 2])
    np.testing.assert_array_equal(answer_pool.best_answers(rewards), [0, 1, 2])
    with pytest.raises(ValueError, match=r"truncated has shape \(2, 3\), rewards \(3, 3\)"):
        answer_pool.best_answers(rewards, truncated[:2])


def test_excluded_answers_are_never_chosen_not_even_as_the_truncated_fallback():
    rewards = np.array([[0.9, 0.2, 0.5], [0.1, 0.4, 0.3], [0.7, 0.8, 0.9]])
    truncated = np.array([[True, False, False], [False, False, False], [True, True, True]])
    excluded = np.array([[False, False, True], [True, True, True], [False, False, True]])  # e.g. empty answers
    np.testing.assert_array_equal(answer_pool.best_answers(rewards, truncated, excluded=excluded), [1, -1, -1])
    np.testing.assert_array_equal(
        answer_pool.best_answers(rewards, truncated, keep_truncated=True, excluded=excluded), [1, -1, 1])
    with pytest.raises(ValueError, match=r"excluded has shape \(2, 3\), rewards \(3, 3\)"):
        answer_pool.best_answers(rewards, excluded=excluded[:2])


def prompt(name, is_safety=False):
    return Prompt([{"role": "user", "content": name}], is_safety)


def test_pool_keeps_the_best_complete_answer_per_prompt_across_rounds(tmp_path):
    pool = answer_pool.AnswerPool()
    # round 1: prompts p, q, r; r's answers were all cut at the length limit
    stats = pool.add([prompt("p"), prompt("q", True), prompt("r")], [["p1", "p2"], ["q1", "q2"], ["r1", "r2"]],
                     [[0.3, 0.6], [0.5, 0.4], [0.9, 0.8]], iteration=1,
                     truncated=[[False, True], [False, False], [True, True]])
    assert (stats.prompts, stats.added, stats.all_truncated) == (3, 2, 1)
    best = [(e.prompt[0]["content"], b.answer, b.reward) for e, b in pool.best()]
    assert best == [("p", "p1", 0.3), ("q", "q1", 0.5)]
    # round 2, another prompt batch: p again (better now), q again (worse: the round-1 answer stays), s new
    pool.add([prompt("s"), prompt("p"), prompt("q", True)], [["s1"], ["p3"], ["q3"]], [[0.2], [0.7], [0.1]],
             iteration=2)
    best = {e.prompt[0]["content"]: (b.answer, b.iteration) for e, b in pool.best()}
    assert best == {"p": ("p3", 2), "q": ("q1", 1), "s": ("s1", 2)}
    assert pool.winners_by_iteration() == {1: 1, 2: 2}
    records = pool.sft_records()
    assert records[1] == {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "q1"}],
                          "train_on": "last", "reward": 0.5, "iteration": 1, "truncated": False, "is_safety": True}

    path = tmp_path / "pool.jsonl"
    pool.save(path)
    loaded = answer_pool.AnswerPool.load(path)
    assert loaded.entries == pool.entries and len(loaded) == 3
    # adding round 2 again (a resumed round) replaces its candidates instead of adding more
    loaded.add([prompt("p")], [["p4"]], [[0.65]], iteration=2)
    entry = loaded.entries[answer_pool.prompt_key(prompt("p").messages)]
    assert [c.answer for c in entry.candidates] == ["p1", "p4"]

    # new reward models: every candidate is rescored, and the winner can change
    loaded.rescore(lambda dialogs: np.array([0.9 if d[-1]["content"] == "p1" else 0.1 for d in dialogs]))
    assert {e.prompt[0]["content"]: b.answer for e, b in loaded.best()}["p"] == "p1"
    with pytest.raises(ValueError, match="returned 1 scores for 5 answers"):
        loaded.rescore(lambda dialogs: np.zeros(1))

    # keep_truncated: r (all cut in round 1) pools its best cut answer, and a later complete answer outranks it
    loaded.add([prompt("r")], [["r1", "r2"]], [[0.9, 0.8]], iteration=1, truncated=[[True, True]], keep_truncated=True)
    loaded.add([prompt("r")], [["r3"]], [[0.2]], iteration=3)
    r_entry = loaded.entries[answer_pool.prompt_key(prompt("r").messages)]
    assert [(c.answer, c.truncated) for c in r_entry.candidates] == [("r1", True), ("r3", False)]
    assert r_entry.best().answer == "r3"
    loaded.save(path)
    assert answer_pool.AnswerPool.load(path).entries == loaded.entries

    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "p"}], "is_safety": False,
                                "candidates": []}) + "\n")
    with pytest.raises(ValueError, match=r"pool.jsonl:1: 'candidates' must be a non-empty list"):
        answer_pool.AnswerPool.load(path)
