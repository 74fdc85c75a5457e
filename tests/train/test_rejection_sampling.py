"""Rejection sampling: prompt readers, the scoring sequence, the pool across iterations, and a tiny end-to-end run
(random policy, a random reward-model checkpoint) whose best-of-K curve rises with K and whose pool keeps the best
answer per prompt across iterations.

Covers llama2_jax.data.prompts and llama2_jax.training.rounds."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.rlhf_models import CFG, make_tokenizer, save_policy, save_reward_model

from configs import rs_7b, rs_tiny
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.data import prompts as prompt_data
from llama2_jax.rlhf import formulas as rlhf
from llama2_jax.training.checks import ConfigError
from train import rejection_sampling as rs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_prompts(path, n):
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"why the cat {i}" if i % 3 else [{"role": "system", "content": "be safe"},
                                                     {"role": "user", "content": f"how can you help {i}"}]
            f.write(json.dumps({"prompt": prompt, "is_safety": i % 2 == 0}) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------- pieces


def test_prompt_files_and_preference_files(tmp_path):
    prompts = prompt_data.read_prompts(str(write_prompts(tmp_path / "p.jsonl", 4)))
    assert [p.is_safety for p in prompts] == [True, False, True, False]
    assert prompts[0].messages[0]["role"] == "system" and prompts[1].messages == [
        {"role": "user", "content": "why the cat 1"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": q, "chosen": "yes", "rejected": "no"}) + "\n"
                             for q in ("a?", "b?", "a?")))
    from_pairs = prompt_data.read_prompts(str(pairs), is_safety=True)
    assert [p.messages[0]["content"] for p in from_pairs] == ["a?", "b?"] and all(p.is_safety for p in from_pairs)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "is_safety": "yes"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'is_safety' is str"):
        prompt_data.read_prompts(str(tmp_path / "bad.jsonl"))


def test_scoring_sequence_appends_eos_after_the_kept_response():
    tokens = jnp.array([[5, 6, 7, 2, -1, -1], [5, 7, 8, 9, 9, 9]])  # row 0 ended (EOS); row 1 cut at max_gen_len 3
    ids, lengths = rlhf.scoring_sequences(tokens, jnp.array([2, 2]), jnp.array([1, 3]), eos_id=2)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 2, 0, 0, 0], [5, 7, 8, 9, 9, 2, 0]])
    np.testing.assert_array_equal(lengths, [4, 6])


def test_combined_score_uses_the_piecewise_rule_with_two_models_and_the_one_model_otherwise():
    fns = {"helpful": lambda p, t, n: jnp.full(t.shape[:1], p), "safety": lambda p, t, n: jnp.array([0.1, 0.9, 0.9])}
    tokens, lengths = jnp.zeros((3, 4), jnp.int32), jnp.ones((3,), jnp.int32)
    both = rlhf.score_sequences(fns, {"helpful": 0.7, "safety": None}, tokens, lengths, jnp.array([False, False, True]))
    np.testing.assert_allclose(both["combined"], [0.1, 0.7, 0.9])
    one = rlhf.score_sequences({"helpful": fns["helpful"]}, {"helpful": 0.7}, tokens, lengths, jnp.array([1, 1, 1]))
    np.testing.assert_allclose(one["combined"], [0.7] * 3)


def test_pool_keeps_the_best_answer_per_prompt_across_iterations(tokenizer):
    prompts = [prompt_data.Prompt([{"role": "user", "content": "q"}]), prompt_data.Prompt([{"role": "user", "content": "r"}])]
    answer = tokenizer.encode("yes")
    first = {"responses": [[answer, []], [[], answer]], "scores": {"combined": np.array([[0.9, 0.1], [0.2, 0.3]])}}
    pool = rs.update_pool({}, prompts, tokenizer, first, iteration=0)
    second = {"responses": [[[], []], [answer, answer]], "scores": {"combined": np.array([[0.5, 0.4], [0.8, 0.1]])}}
    pool = rs.update_pool(pool, prompts, tokenizer, second, iteration=1)
    assert [(pool[p]["iteration"], pool[p]["reward"]) for p in (0, 1)] == [(0, pytest.approx(0.9)),
                                                                              (1, pytest.approx(0.8))]
    assert pool[0]["messages"][-1] == {"role": "assistant", "content": "yes"} and pool[0]["train_on"] == "last"


def test_pool_leaves_out_truncated_answers_unless_told_and_then_ranks_them_below_complete_ones(tokenizer):
    prompts = [prompt_data.Prompt([{"role": "user", "content": c}]) for c in "qrs"]
    yes, no = tokenizer.encode("yes"), tokenizer.encode("no")
    first = {"responses": [[yes, no], [yes, no], [yes, no]],
             "scores": {"combined": np.array([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6]])},
             "truncated": np.array([[True, False], [True, True], [False, False]])}
    pool = rs.update_pool({}, prompts, tokenizer, first, iteration=0)
    assert {p: (e["reward"], e["truncated"]) for p, e in pool.items()} == {0: (0.2, False), 2: (0.6, False)}
    kept = rs.update_pool({}, prompts, tokenizer, first, iteration=0, keep_truncated=True)
    assert {p: (e["reward"], e["truncated"]) for p, e in kept.items()} == {0: (0.2, False), 1: (0.8, True),
                                                                          2: (0.6, False)}
    second = {"responses": [[yes], [no], [yes]], "scores": {"combined": np.array([[0.95], [0.1], [0.5]])},
              "truncated": np.array([[True], [False], [True]])}
    kept = rs.update_pool(kept, prompts, tokenizer, second, iteration=1, keep_truncated=True)
    # q: a cut 0.95 does not replace the complete 0.2; r: a complete 0.1 replaces the cut 0.8; s: 0.6 stays
    assert {p: (e["reward"], e["iteration"]) for p, e in kept.items()} == {0: (0.2, 0), 1: (0.1, 1), 2: (0.6, 0)}


def test_configs_load_and_bad_fields_are_one_line_errors(tmp_path):
    for module in (rs_7b, rs_tiny):
        config = module.get_config()
        assert config.reward.safety_threshold == 0.15 and config.sampling.num_samples >= 1
    config = rs_tiny.get_config()
    config.sampling.top_p = 0.0
    with pytest.raises(ConfigError, match=r"^config.sampling: temperature .* top_p 0.0"):
        rs.train_and_evaluate(config, str(tmp_path))
    config = rs_tiny.get_config()
    with pytest.raises(ConfigError, match=r"^config.init_from is empty"):
        rs.train_and_evaluate(config, str(tmp_path))


# ------------------------------------------------------------------------------------------------------ end to end


def tiny_config(tmp_path, tokenizer):
    config = rs_tiny.get_config()
    config.init_from = str(save_policy(tmp_path / "policy", tokenizer))
    config.reward.helpful_path = str(save_reward_model(tmp_path / "rm_helpful", seed=1))
    config.reward.safety_path = str(save_reward_model(tmp_path / "rm_safety", seed=2))
    config.prompts.path = str(write_prompts(tmp_path / "prompts.jsonl", 8))
    config.prompts.max_prompt_len, config.sampling.max_gen_len = 32, 16
    config.sampling.num_samples, config.sampling.batch_size, config.sampling.temperature = 8, 32, 1.5
    config.mesh.data, config.mesh.fsdp = -1, 1  # the 8 simulated devices, data parallel
    config.iterations = 2
    config.sampling.keep_truncated = False  # the paper-scale rule: answers cut at max_gen_len stay out of the pool
    sft = config.sft
    sft.seq_len, sft.batch_size, sft.num_train_steps, sft.log_every_steps = 64, 8, 2, 2
    sft.checkpoint_every_steps, sft.async_checkpoints = 2, False
    return config


@pytest.mark.slow
def test_tiny_rejection_sampling_end_to_end(tmp_path, tokenizer):
    config = tiny_config(tmp_path, tokenizer)
    work = tmp_path / "rs"
    result = rs.train_and_evaluate(config, str(work))
    history = result.history

    assert [h["iteration"] for h in history] == [0, 1]
    for record in history:
        curve = np.array(result.summary["best_of_k"][record["iteration"]])
        assert len(curve) == 8 and np.all(np.diff(curve) >= -1e-7), curve  # expected max never falls with K
        assert curve[-1] > curve[0] + 0.01, curve  # and rises: best of 8 beats one sample
        assert curve[0] == pytest.approx(record["reward_combined_mean"], abs=1e-5)
        assert curve[-1] == pytest.approx(record["best_of_k_mean"], abs=1e-5)

    def read(name):
        return [json.loads(line) for line in (work / name).read_text().splitlines()]

    pool = {entry["prompt_index"]: entry for entry in read("iter_1/pool.jsonl")}
    pool_0 = {entry["prompt_index"]: entry for entry in read("iter_0/pool.jsonl")}
    samples, first = read("iter_1/samples.jsonl"), read("iter_0/samples.jsonl")
    assert len(samples) == len(first) == 8
    # The pool holds, per prompt, the best answer across both iterations among those neither cut at max_gen_len nor
    # empty; a prompt with no such answer has no entry. The random policy ends some answers and not others: both
    # cases occur.
    cut = [c for record in samples + first for c in record["truncated"]]
    assert any(cut) and not all(cut)
    for p, (now, before) in enumerate(zip(samples, first)):
        complete = [s for record in (now, before)
                    for s, c, n in zip(record["combined"], record["truncated"], record["response_tokens"]) if not c and n]
        if not complete:
            assert p not in pool
            continue
        assert pool[p]["reward"] == pytest.approx(max(complete), abs=1e-6)
        assert pool[p]["messages"][-1]["role"] == "assistant" and pool[p]["train_on"] == "last"
    assert all(pool[p]["reward"] >= entry["reward"] - 1e-6 for p, entry in pool_0.items())  # never worse later
    assert history[1]["truncated_fraction"] == pytest.approx(np.mean([c for r in samples for c in r["truncated"]]))
    safety_rows = [s for s in samples if s["is_safety"]]
    np.testing.assert_allclose(safety_rows[0]["combined"], safety_rows[0]["safety"])  # tagged: the safety score
    saved = json.loads((work / "best_of_k.json").read_text())
    assert set(saved) == {"0", "1"} and (work / "best_of_k.png").stat().st_size > 1000
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 2
    params, cfg = checkpoint.load_params(work / "iter_1" / "sft")  # the fine-tuned policy is an init_from
    assert cfg.vocab_size == CFG.vocab_size and "output" in params

    again = rs.train_and_evaluate(config, str(work))  # finished iterations are skipped on a re-run
    assert again.history == [] and again.product == str(work / "iter_1" / "sft")
    assert rlhf.best_of_k_curve(np.array([r["combined"] for r in samples]))[-1] == pytest.approx(
        history[1]["best_of_k_mean"], abs=1e-6)
