"""The paper's remaining recipe details: PPO early stopping on the held-out reward with the best policy kept, the
34B/70B values (β 0.005, RM LR 5e-6), the per-iteration RS temperature schedule, and per-answer safety labels that
exclude "chosen unsafe, other safe" pairs from the safety RM data."""

import dataclasses
import json

import numpy as np
import pytest
from helpers.rlhf_models import CFG, llama_params

from configs import ppo_7b, ppo_70b, rm_helpful_7b, rm_helpful_70b, rm_safety_7b, rm_safety_70b, rs_7b, rs_tiny
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.data import preferences, rm
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.setup import make_mesh
from train import ppo
from train import rejection_sampling as rs


def test_early_stop_counts_evaluations_since_the_strict_best():
    evals = [(5, 0.2), (10, 0.4), (15, 0.4), (20, 0.3)]  # 0.4 at 15 ties, it does not improve
    assert ppo.early_stop(evals, patience=2) == {"best_iteration": 10, "best_reward": 0.4, "evals_since_best": 2,
                                                 "stop": True}
    assert not ppo.early_stop(evals, patience=3)["stop"] and not ppo.early_stop(evals, patience=0)["stop"]
    assert ppo.early_stop(evals[:2], patience=1)["evals_since_best"] == 0
    assert ppo.early_stop([], patience=1)["stop"] is False


def test_best_policy_is_saved_on_improvement_and_resume_drops_later_evaluations(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"spm")
    best = ppo.BestPolicy(str(tmp_path), patience=2, resumed_at=0)
    params_a, params_b = llama_params(CFG, 0), llama_params(CFG, 1)
    assert not best.update(5, 0.3, params_a, CFG)["stop"]
    assert not best.update(10, 0.5, params_b, CFG)["stop"]
    assert not best.update(15, 0.4, params_a, CFG)["stop"]  # not better: WORKDIR/best keeps iteration 10
    saved, cfg = checkpoint.load_params(tmp_path / "best")
    np.testing.assert_array_equal(np.asarray(saved["output"]), np.asarray(params_b["output"]))
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {"iteration": 10,
                                                                         "eval_reward_combined": 0.5}
    assert (tmp_path / "best" / "tokenizer.model").read_bytes() == b"spm" and cfg == CFG
    assert best.update(20, 0.1, params_a, CFG)["stop"]  # two evaluations without improvement

    resumed = ppo.BestPolicy(str(tmp_path), patience=2, resumed_at=15)  # the checkpoint was at iteration 15
    assert resumed.evals == [(5, 0.3), (10, 0.5), (15, 0.4)] and resumed.best_reward == 0.5
    assert not resumed.update(20, 0.6, params_a, CFG)["stop"]
    assert json.loads((tmp_path / "best" / "best.json").read_text())["iteration"] == 20


def test_ppo_early_stop_field_is_checked(tmp_path):
    assert ppo_7b.get_config().early_stop_patience > 0
    config = ppo_7b.get_config()
    config.init_from, config.prompts.val_fraction = str(tmp_path), 0.0
    with pytest.raises(ConfigError, match=r"^config.early_stop_patience \(5\) .*val_fraction > 0"):
        ppo.check_config(config, make_mesh(config), dataclasses.replace(CFG, max_seq_len=4096))


def test_70b_configs_carry_the_papers_34b_70b_values():
    assert ppo_7b.get_config().beta == 0.01 and ppo_70b.get_config().beta == 0.005
    assert ppo_70b.get_config().learning_rate == ppo_7b.get_config().learning_rate == 1e-6
    assert rm_helpful_7b.get_config().learning_rate == rm_safety_7b.get_config().learning_rate == 1e-5
    helpful, safety = rm_helpful_70b.get_config(), rm_safety_70b.get_config()
    assert helpful.learning_rate == safety.learning_rate == 5e-6
    assert (helpful.data.mix, safety.data.mix) == ("helpful", "safety")
    assert safety.num_epochs == 1.0 and safety.batch_size == 512


def test_rejection_sampling_temperature_schedule_per_iteration():
    config = rs_7b.get_config()
    assert rs.iteration_temperature(config, 0) == rs.iteration_temperature(config, 3) == 1.2  # no schedule
    config.sampling.temperature_schedule = (1.4, 1.3, 1.2)
    assert [rs.iteration_temperature(config, i) for i in range(5)] == [1.4, 1.3, 1.2, 1.2, 1.2]
    config = rs_tiny.get_config()
    config.sampling.temperature_schedule = (1.0, -0.5)
    with pytest.raises(ConfigError, match=r"^config.sampling.temperature_schedule \(1.0, -0.5\)"):
        rs.check_config(config, make_mesh(config))


def test_safety_labels_per_answer_exclude_chosen_unsafe_other_safe_from_the_safety_mix(tmp_path):
    path = tmp_path / "pairs.jsonl"
    labels = [(True, False), (True, True), (False, False), (False, True), (None, None)]
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b", "is_safety": True,
                                        "chosen_safe": c, "rejected_safe": r}) + "\n"
                            for i, (c, r) in enumerate(labels)))
    pairs, _ = preferences.read_preferences(str(path), "jsonl")
    assert [(p.chosen_safe, p.rejected_safe) for p in pairs] == labels
    assert [p.chosen_unsafe_other_safe for p in pairs] == [False, False, False, True, False]
    mixed = rm.safety_mix(pairs, seed=0)
    assert [p.prompt[0]["content"] for p in mixed] == ["q0", "q1", "q2", "q4"]  # q3 excluded, the rest kept
    assert len(rm.helpful_mix(pairs, seed=0)) == 0 or all(p.is_safety for p in rm.helpful_mix(pairs, seed=0))
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "chosen_safe": "yes"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: 'chosen_safe' is str"):
        preferences.read_preferences(str(path), "jsonl")
