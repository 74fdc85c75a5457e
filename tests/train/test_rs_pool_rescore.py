"""Rejection sampling across RLHF rounds (paper section 3.2.3): a pool carried over from the previous round is re-scored
by this round's reward models before the selection, so a pooled answer's old score (another reward model's) never
decides against a new answer. Fast: a stand-in tokenizer, stand-in score functions, no model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import rs_tiny
from llama2_jax.data.prompts import Prompt
from llama2_jax.model import sharding as sh
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.outputs import write_jsonl
from llama2_jax.training.rlhf_setup import Rewards
from train import rejection_sampling as rs


class WordTokenizer:
    """Token ids written as words ("5 6" <-> [5, 6]): enough for the pool, which decodes answers to text."""

    eos_id = 2

    @staticmethod
    def decode(ids):
        return " ".join(str(i) for i in ids)

    @staticmethod
    def encode(text):
        return [int(word) for word in text.split()]


PROMPTS = [Prompt([{"role": "user", "content": "q"}]), Prompt([{"role": "user", "content": "r"}], is_safety=True)]


def samples(responses, scores):
    return {"responses": responses, "scores": {"combined": np.array(scores)}}


def first_round_pool():
    """Round 1's pool, scored by round 1's reward models: q -> [5, 6] (0.9), r -> [9, 9] (0.3)."""
    return rs.update_pool({}, PROMPTS, WordTokenizer, samples([[[5, 6], [7]], [[8], [9, 9]]], [[0.9, 0.1], [0.2, 0.3]]),
                          iteration=0)


class NewRewardModels:
    """Round 2's reward models as a `PoolScorer`: scores by answer, every call recorded."""

    def __init__(self, by_answer):
        self.by_answer, self.calls = by_answer, []

    def __call__(self, indices, answers):
        self.calls.append((list(indices), [list(a) for a in answers]))
        return np.array([self.by_answer[tuple(a)] for a in answers])


def test_rescored_pool_takes_the_new_scores_and_the_selection_uses_them():
    pool = first_round_pool()
    assert {p: (e["answer_tokens"], e["reward"]) for p, e in pool.items()} == {0: ([5, 6], 0.9), 1: ([9, 9], 0.3)}
    new_rms = NewRewardModels({(5, 6): 0.2, (9, 9): 0.95})
    rescored = rs.rescore_pool(pool, new_rms, WordTokenizer)
    assert new_rms.calls == [([0, 1], [[5, 6], [9, 9]])]  # every pooled answer, in one batched call
    assert {p: e["reward"] for p, e in rescored.items()} == {0: 0.2, 1: 0.95}
    for p in pool:  # only the reward changes, and the pool it came from is left as it was
        assert {**rescored[p], "reward": pool[p]["reward"]} == pool[p]
    assert pool[0]["reward"] == 0.9

    # round 2's samples, scored by round 2's reward models: q's best 0.5, r's best 0.8
    second = samples([[[1], [3]], [[4], [4, 4]]], [[0.5, 0.4], [0.8, 0.1]])
    merged = rs.update_pool(rescored, PROMPTS, WordTokenizer, second, iteration=1)
    # q: the new 0.5 beats the pooled answer's new score 0.2 (its old 0.9 would have kept it)
    assert (merged[0]["answer_tokens"], merged[0]["reward"], merged[0]["iteration"]) == ([1], 0.5, 1)
    assert merged[0]["messages"][-1] == {"role": "assistant", "content": "1"}
    # r: the pooled answer's new 0.95 beats the new 0.8 (its old 0.3 would have lost)
    assert (merged[1]["answer_tokens"], merged[1]["reward"], merged[1]["iteration"]) == ([9, 9], 0.95, 0)
    stale = rs.update_pool(pool, PROMPTS, WordTokenizer, second, iteration=1)  # without re-scoring: the other way
    assert (stale[0]["iteration"], stale[1]["iteration"]) == (0, 1)


def test_a_pool_without_answer_tokens_is_rescored_from_its_text_and_a_wrong_count_is_an_error():
    pool = {p: {k: v for k, v in e.items() if k != "answer_tokens"} for p, e in first_round_pool().items()}
    new_rms = NewRewardModels({(5, 6): 0.4, (9, 9): 0.6})
    assert {p: e["reward"] for p, e in rs.rescore_pool(pool, new_rms, WordTokenizer).items()} == {0: 0.4, 1: 0.6}
    assert new_rms.calls == [([0, 1], [[5, 6], [9, 9]])]
    with pytest.raises(ValueError, match=r"^the pool scorer returned 1 scores for 2 pooled answers$"):
        rs.rescore_pool(pool, lambda indices, answers: np.zeros(1), WordTokenizer)
    assert rs.rescore_pool({}, new_rms, WordTokenizer) == {} and len(new_rms.calls) == 1


def test_carried_pool_reads_checks_and_rescores_the_previous_rounds_file(tmp_path):
    path = str(tmp_path / "pool.jsonl")
    write_jsonl(path, first_round_pool().values())
    config = rs_tiny.get_config()
    config.pool_from = path
    pool, figures = rs.carried_pool(config, PROMPTS, WordTokenizer, NewRewardModels({(5, 6): 0.2, (9, 9): 0.95}))
    assert {p: e["reward"] for p, e in pool.items()} == {0: 0.2, 1: 0.95}
    assert figures == {"pool_rescored": 2, "pool_rescored_reward_before_mean": pytest.approx(0.6),
                       "pool_rescored_reward_mean": pytest.approx(0.575)}
    config.pool_from = ""
    assert rs.carried_pool(config, PROMPTS, WordTokenizer, None) == ({}, {})
    config.pool_from = path  # a different prompt list than the run that wrote the pool: refused, naming the entry
    other = [PROMPTS[1], PROMPTS[0]]
    with pytest.raises(ConfigError, match=r"^config.pool_from .*pool.jsonl: its entry for prompt_index 0 is not "
                                          r"this run's prompt 0 \(config.prompts must"):
        rs.carried_pool(config, other, WordTokenizer, NewRewardModels({}))
    with pytest.raises(ConfigError, match=r"entry for prompt_index 1 is not this run's prompt 1"):
        rs.carried_pool(config, PROMPTS[:1], WordTokenizer, NewRewardModels({}))
    with open(path) as f:  # the previous round's file is not rewritten
        assert json.loads(f.readline())["reward"] == 0.9


def token_sum(scale, tokens, lengths):
    """A stand-in reward model: scale x (the sum of the scored ids up to the length) / 1000."""
    inside = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return scale * jnp.sum(jnp.where(inside, tokens, 0), axis=1) / 1000.0


def test_pool_scorer_scores_prompt_answer_and_eos_with_the_combined_rule_in_batches_on_the_mesh():
    config = rs_tiny.get_config()
    config.prompts.max_prompt_len, config.sampling.max_gen_len, config.sampling.batch_size = 6, 4, 8
    rewards = Rewards({"helpful": token_sum, "safety": lambda scale, tokens, lengths: jnp.full(tokens.shape[:1], 0.5)},
                      {"helpful": jnp.float32(2.0), "safety": None})
    prompts = [Prompt([{"role": "user", "content": str(i)}], is_safety=i == 3) for i in range(4)]
    encoded = [[1, 10 + i, 20] for i in range(4)]
    scorer = rs.make_pool_scorer(config, rewards, prompts, encoded, WordTokenizer.eos_id,
                                 sh.make_mesh(data=-1, fsdp=1, tensor=1))
    # 10 answers: two calls of 8 rows (the second padded); one answer longer than max_gen_len (an earlier round's)
    indices = [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    answers = [[30 + j] * (j % 3) for j in range(9)] + [[7] * 9]
    scores = scorer(indices, answers)
    expected = [2.0 * (sum(encoded[p]) + sum(a) + WordTokenizer.eos_id) / 1000 for p, a in zip(indices, answers)]
    expected[3] = 0.5  # a safety prompt: the safety model's score (rlhf.combine_rewards)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_an_empty_answer_never_enters_the_pool_whatever_its_score():
    scored = samples([[[], [5]], [[], []], [[], [6]]], [[0.9, 0.2], [0.8, 0.7], [0.95, 0.1]])
    scored["truncated"] = np.array([[False, False], [False, False], [False, True]])
    for keep_truncated in (False, True):
        pool = rs.update_pool({}, PROMPTS + [Prompt([{"role": "user", "content": "s"}])], WordTokenizer, scored,
                              iteration=0, keep_truncated=keep_truncated)
        # q: the non-empty 0.2 over the empty 0.9; r: only empty answers, no entry; s: a cut answer only when kept
        expected = {0: ([5], 0.2)} | ({2: ([6], 0.1)} if keep_truncated else {})
        assert {p: (e["answer_tokens"], e["reward"]) for p, e in pool.items()} == expected
