"""Reward functions named in the config (llama2_jax/rlhf/reward_functions.py): loading with one-line errors, weights,
failures counted with the fallback, the Llama 2 reward-model pair from its scores; the synthetic arithmetic task
(llama2_jax/data/arithmetic.py) and its exact-match reward.

Covers llama2_jax.data.arithmetic."""

import logging
import math
import re

import numpy as np
import pytest

from llama2_jax.data import arithmetic, dialogs
from llama2_jax.rlhf import reward_functions as rf
from llama2_jax.training.checks import ConfigError

HERE = "tests.rlhf.test_reward_functions"


# Reward functions the tests name by "package.module:function".
def length_reward(prompts, completions, **fields):
    return [len(c) for c in completions]


def flaky_reward(prompts, completions, **fields):
    """Raises on "boom" (so the whole batch call raises), None for "none", NaN for "nan", inf for "inf", a string
    for "text"; else 1.0."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom\nmore detail on a second line")
    special = {"none": None, "nan": math.nan, "inf": math.inf, "text": "x"}
    return [special.get(c, 1.0) for c in completions]


def short_reward(prompts, completions):
    return [1.0]  # one value whatever the batch


def answer_only(prompts, completions, answer):
    return [float(a == c) for a, c in zip(answer, completions)]


def no_completions(prompts, texts):
    return [0.0 for _ in texts]


NOT_A_FUNCTION = 3


# ----------------------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("spec,message", [
    ("length_reward", r"expected 'package\.module:function'"),
    (":f", r"expected 'package\.module:function'"),
    ("no_such_package_xyz.mod:f", r"cannot import no_such_package_xyz\.mod \(ModuleNotFoundError: "),
    (f"{HERE}:missing", r"tests\.rlhf\.test_reward_functions has no attribute missing"),
    (f"{HERE}:NOT_A_FUNCTION", r"NOT_A_FUNCTION is a int, not a function"),
    (f"{HERE}:no_completions", r"no_completions takes no completions keyword argument"),
])
def test_a_bad_name_is_one_line_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match=rf"^config\.reward\.fn={re.escape(repr(spec))}: {message}") as error:
        rf.load_reward_fn(spec)
    assert "\n" not in str(error.value)


def test_weights_and_fallback_are_checked():
    with pytest.raises(ConfigError, match=r"^config\.reward\.weights has 1 weights for the 2 functions"):
        rf.load_rewards(f"{HERE}:length_reward,{HERE}:flaky_reward", "0.5")
    with pytest.raises(ConfigError, match=r"^config\.reward\.weights: 'nan' is not a finite number"):
        rf.load_rewards([f"{HERE}:length_reward"], ["nan"])
    with pytest.raises(ConfigError, match=r"^config\.reward\.fallback: 'low' is not a number"):
        rf.load_rewards(f"{HERE}:length_reward", fallback="low")
    with pytest.raises(ConfigError, match=r"^config\.reward\.fn is empty"):
        rf.load_rewards(" , ")
    rewards = rf.load_rewards(f"{HERE}:length_reward, llama2_jax.data.arithmetic:exact_match", "0.5, 2", -1.0)
    assert [(r.name, r.weight, r.fallback) for r in rewards] == [("length_reward", 0.5, -1.0),
                                                                 ("exact_match", 2.0, -1.0)]


def test_a_field_a_function_needs_is_checked_before_training():
    rewards = rf.load_rewards("llama2_jax.data.arithmetic:exact_match")
    assert rf.required_fields(rewards[0].fn) == ("answer",)
    rf.check_reward_fields(rewards, ["prompt", "answer"])
    with pytest.raises(ConfigError, match=r"^config\.reward\.fn: llama2_jax\.data\.arithmetic:exact_match needs the "
                                          r"field\(s\) answer, which the prompt records lack \(they have: is_safety, "
                                          r"prompt\)$"):
        rf.check_reward_fields(rewards, ["prompt", "is_safety"])


# ----------------------------------------------------------------------------------------------------------------------
# Computing


def test_weighted_sum_of_rewards_and_only_accepted_fields_passed():
    rewards = rf.load_rewards(f"{HERE}:answer_only,{HERE}:length_reward", [2.0, -0.1])
    result = rf.compute_rewards(rewards, ["q1", "q1", "q2"], ["7", "12", "x"],
                                {"answer": ["7", "7", "x"], "is_safety": [False, False, True]})
    np.testing.assert_allclose(result.per_reward["answer_only"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(result.per_reward["length_reward"], [1.0, 2.0, 1.0])
    np.testing.assert_allclose(result.total, [2.0 - 0.1, -0.2, 2.0 - 0.1], rtol=1e-6)
    assert result.failures == {"answer_only": 0, "length_reward": 0} and result.total.dtype == np.float32
    same = rf.compute_rewards(rewards + rewards[:1], ["q"], ["7"], {"answer": ["7"]})
    assert set(same.per_reward) == {"answer_only", "length_reward", "answer_only_2"}


def test_failures_are_counted_logged_and_get_the_fallback(caplog):
    rewards = rf.load_rewards([f"{HERE}:flaky_reward", f"{HERE}:short_reward"], fallback=-0.5)
    completions = ["ok", "boom", "none", "nan", "inf", "text", "ok"]
    with caplog.at_level(logging.WARNING, logger="llama2_jax.rlhf.reward_functions"):
        result = rf.compute_rewards(rewards, ["p"] * 7, completions)
    np.testing.assert_allclose(result.per_reward["flaky_reward"], [1.0, -0.5, -0.5, -0.5, -0.5, -0.5, 1.0])
    assert result.failures == {"flaky_reward": 5, "short_reward": 0}  # one value: right for one completion at a time
    np.testing.assert_allclose(result.per_reward["short_reward"], np.ones(7))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [(f"reward {HERE}:flaky_reward failed on 5 of 7 completions (first: #1, RuntimeError: boom); "
                         "they get the fallback -0.5"),
                        (f"reward {HERE}:short_reward: the call on the batch failed (returned 1 values for 7 "
                         "completions), the calls on one completion at a time did not")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llama2_jax.rlhf.reward_functions"):
        nan_only = rf.compute_rewards(rewards[:1], ["p", "p", "p"], ["ok", "nan", "none"])
    np.testing.assert_allclose(nan_only.total, [1.0, -0.5, -0.5])
    assert nan_only.failures == {"flaky_reward": 2}
    assert [r.getMessage() for r in caplog.records] == [
        (f"reward {HERE}:flaky_reward failed on 2 of 3 completions (first: #1, None/NaN/inf/not a number); they get "
         "the fallback -0.5")]


# ----------------------------------------------------------------------------------------------------------------------
# The Llama 2 reward-model pair


def test_llama2_rm_pair_reward_from_scores_by_hand():
    helpful, safety, is_safety = [0.9, 0.2, 0.7, 0.6], [0.5, 0.1, 0.95, 0.3], [False, False, True, False]
    # piecewise (paper section 3.2.3): safety prompt or Rs < 0.15 -> Rs, else Rh
    combined = np.array([0.9, 0.1, 0.95, 0.6])
    logits = np.log(combined / (1.0 - combined))
    whitened = (logits - logits.mean()) / (logits.std() + 1e-8)
    np.testing.assert_allclose(rf.rm_pair_reward(helpful, safety, is_safety), whitened, rtol=1e-5)
    np.testing.assert_allclose(rf.rm_pair_reward(helpful, safety, is_safety, whiten=False), logits, rtol=1e-5)
    rewards = rf.load_rewards("llama2_jax.rlhf.reward_functions:llama2_rm_pair")
    assert rf.required_fields(rewards[0].fn) == ("helpful_score", "safety_score")
    result = rf.compute_rewards(rewards, ["p"] * 4, ["a", "b", "c", "d"],
                                {"helpful_score": helpful, "safety_score": safety, "is_safety": is_safety,
                                 "answer": ["", "", "", ""]})
    np.testing.assert_allclose(result.total, whitened, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The arithmetic task


def test_arithmetic_problems_are_fixed_by_the_seed_and_split_disjointly():
    task = arithmetic.ArithmeticTask(num_train=300, num_heldout=50, max_operand=20, operations="+-*", seed=7)
    train, heldout = arithmetic.make_problems(task)
    assert (train, heldout) == arithmetic.make_problems(task)
    assert len(train) == 300 and len(heldout) == 50
    prompts = [r["prompt"] for r in train + heldout]
    assert len(set(prompts)) == 350  # drawn without replacement: the splits share no problem
    _, other_heldout = arithmetic.make_problems(arithmetic.ArithmeticTask(
        num_train=300, num_heldout=50, max_operand=20, operations="+-*", seed=8))
    assert other_heldout != heldout
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    seen_ops = set()
    for record in train + heldout:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", record["prompt"]).groups()
        assert 0 <= int(a) <= 20 and 0 <= int(b) <= 20
        assert record["answer"] == str(ops[op](int(a), int(b)))
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*"}
    assert arithmetic.problem_record(17, "+", 25) == {"prompt": "What is 17 + 25?", "answer": "42"}
    assert dialogs.messages_to_dialog(arithmetic.sft_record(heldout[0]))[1] == {"role": "assistant",
                                                                                "content": heldout[0]["answer"]}


def test_arithmetic_sizes_are_checked():
    with pytest.raises(ConfigError, match=r"^config\.arithmetic: num_train \+ num_heldout = 20 exceeds the 18"):
        arithmetic.make_problems(arithmetic.ArithmeticTask(num_train=15, num_heldout=5, max_operand=2))
    with pytest.raises(ConfigError, match=r"^config\.arithmetic\.operations='\+/' must be distinct characters"):
        arithmetic.ArithmeticTask(operations="+/").check()
    with pytest.raises(ConfigError, match=r"^config\.arithmetic\.max_operand=1 is below min_operand=5"):
        arithmetic.ArithmeticTask(min_operand=5, max_operand=1).check()


def test_exact_match_reads_the_first_integer():
    completions = ["42", "The answer is 42.", "42 is it, not 43", "43, no: 42", "4 2", "", "forty-two", "420",
                   " -8", "17 - 25 = -8"]
    answers = ["42"] * 8 + ["-8", "-8"]
    assert arithmetic.exact_match(["q"] * 10, completions, answer=answers) == [
        1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert arithmetic.first_integer("x = -12 or 5") == -12 and arithmetic.first_integer("none") is None
    result = rf.compute_rewards(rf.load_rewards("llama2_jax.data.arithmetic:exact_match"), ["q"] * 2, ["42", "41"],
                                {"answer": ["42", "42"]})
    np.testing.assert_allclose(result.total, [1.0, 0.0])
