"""train.recipe's RLHF rounds (paper section 3.2, Figure 1): the plan of stages (fast), and a two-round tiny run
(slow): round 2's reward models train on round 1's and round 2's labels, the rejection-sampling pool holds answers of
both rounds, REPORT.md has the per-round table and the proxy-vs-gold plot, and a kill during round 2's reward-model
training resumes there with the same products."""

import json
import os

import pytest
from helpers.recipe import short_recipe

from configs import recipe_7b, recipe_tiny
from llama2_jax.data import preferences
from llama2_jax.evaluation import recipe_report
from train import recipe


def names(config):
    return [planned.name for planned in recipe.plan(config)]


def test_plan_of_the_tiny_rounds():
    config = recipe_tiny.get_config()
    config.rlhf.rounds, config.rlhf.gatt_after_round = 2, 3  # GAtt after round 3, clipped to 2 (the tiny config: 0)
    assert names(config) == [
        "pretrain", "sft", "rm_helpful", "rm_safety", "gold_rm",
        "round_1_pairs", "round_1_rm_helpful", "round_1_rm_safety", "round_1_rs", "round_1_eval",
        "round_2_pairs", "round_2_rm_helpful", "round_2_rm_safety", "round_2_rs", "round_2_ppo", "round_2_gatt",
        "round_2_eval", "cd"]
    planned = {p.name: p for p in recipe.plan(config)}
    assert planned["round_2_rs"].dir == "round_2/rs"
    rs = planned["round_2_rs"].stage.commands[0]
    assert "--config.init_from={round_1_rs}" in rs and "--config.pool_from={round_1_rs}/../pool.jsonl" in rs
    assert "--config.reward.helpful_path={round_2_rm_helpful}" in rs and "--config.first_iteration=1" in rs
    pairs = planned["round_2_pairs"].stage.commands[0]
    assert "--policy={round_1_rs}" in pairs and "--rm_helpful={round_1_rm_helpful}" in pairs  # before retraining
    assert "--previous={round_1_pairs}" in pairs
    assert "--config.init_from={sft}" in planned["round_2_rm_helpful"].stage.commands[0]
    assert "--config.init_from={round_2_gatt}" in planned["cd"].stage.commands[0]

    config.rlhf.rm_init = "continue"
    assert "--config.init_from={round_1_rm_safety}" in recipe.plan(config)[12].stage.commands[0]
    config.rlhf.rounds, config.rlhf.ppo_from_round, config.rlhf.gatt_after_round = 3, 2, 1
    listed = names(config)
    assert [n for n in listed if n.endswith(("_ppo", "_gatt"))] == ["round_1_gatt", "round_2_ppo", "round_3_ppo"]
    config.rlhf.ppo_from_round = 4
    with pytest.raises(recipe.RecipeError, match=r"^config.rlhf.ppo_from_round=4 must be in 0..rlhf.rounds \(3\)"):
        recipe.plan(config)
    config.rlhf.rounds = 0
    assert names(config) == list(recipe_tiny.get_config().stage_order.split(","))


def test_plan_of_the_7b_rounds():
    config = recipe_7b.get_config()
    listed = names(config)
    assert config.rlhf.rounds == 5 and listed[-1] == "cd"
    assert [n for n in listed if n.endswith(("_ppo", "_gatt"))] == ["round_3_gatt", "round_5_ppo"]
    assert sum(n.endswith("_rs") for n in listed) == 5


def short_rounds():
    """short_recipe with configs/recipe_tiny.py's shipped rounds (at least two) of 12 pairs, reward models of 2
    steps, RS of 2 samples; no PPO/GAtt/CD."""
    config = short_recipe()
    config.rlhf.rounds = recipe_tiny.get_config().rlhf.rounds  # short_recipe's one-pass 0 back to the shipped value
    assert config.rlhf.rounds >= 2
    config.stage_order = "pretrain,sft,rm_helpful,rm_safety,rs"
    config.eval.stages = "pretrain"
    config.eval.limit = 4
    stages = config.rlhf.stages
    rm = "--config.num_train_steps=2 --config.seq_len=128 --config.batch_size=8 --config.checkpoint_every_steps=1 " \
         "--config.eval_every_steps=2 --config.eval_batches=1"
    for name in ("gold_rm", "rm_helpful", "rm_safety"):  # round 1: 12 labels, 2 held out, batch 8
        stages[name].extra = rm
    small = "--num_prompts=12 --eval_prompts=4 --max_gen_len=8"
    stages.pairs.extra = small
    stages.eval.extra = small
    stages.rs.extra = config.stages.rs.extra
    return config


def labels(path):
    return preferences.read_preferences(path)[0]


@pytest.mark.slow
def test_two_rounds_retrain_on_all_labels_pool_across_rounds_and_resume(tmp_path):
    config, work = short_rounds(), str(tmp_path / "recipe")
    manifest = recipe.run_recipe(config, work)
    stages = manifest["stages"]
    first, second = stages["round_1_pairs"]["metrics"], stages["round_2_pairs"]["metrics"]
    assert first["new_labels"] > 0 and second["earlier_labels"] == first["all_labels"] == first["new_labels"]
    assert second["all_labels"] == first["new_labels"] + second["new_labels"]
    for kind in ("helpful", "safety"):  # round 2's RMs trained on both rounds' labels (train + held-out split)
        rm = stages[f"round_2_rm_{kind}"]["metrics"]
        assert rm["train_pairs"] + rm["eval_pairs"] == second["all_labels"], kind
        assert 0 <= second[f"rm_{kind}_accuracy_before"] <= 1
    all_labels = labels(os.path.join(work, "round_2", "pairs", "preferences_all.jsonl"))
    assert all_labels[:first["new_labels"]] == labels(os.path.join(work, "round_1", "pairs", "labels.jsonl"))
    assert {p.origin for p in all_labels} == {"collected"}

    pool = [json.loads(line) for line in open(os.path.join(work, "round_2", "rs", "iter_0", "pool.jsonl"))]
    round_1_pool = [json.loads(line) for line in open(os.path.join(work, "round_1", "rs", "iter_0", "pool.jsonl"))]
    assert {entry["iteration"] for entry in round_1_pool} == {0}
    assert {entry["iteration"] for entry in pool} <= {0, 1} and len(pool) >= len(round_1_pool)
    kept = [e for e in pool if e["iteration"] == 0]  # entries of round 1 that round 2 did not beat, as pooled then
    # but for their reward: round 2's reward models re-scored every carried-over answer before selecting
    assert all(e in [{**r, "reward": e["reward"]} for r in round_1_pool] for e in kept)
    assert stages["round_2_rs"]["metrics"]["pool_rescored"] == len(round_1_pool)
    for k in (1, 2):
        figures = stages[f"round_{k}_eval"]["metrics"]
        for key in ("proxy_helpful_mean", "gold_helpful_mean", "win_rate_vs_sft"):
            assert 0 <= figures[key] <= 1, (k, key)
    report = open(os.path.join(work, "REPORT.md")).read()
    assert "## RLHF rounds" in report and "| rm_helpful_accuracy_before |" in report
    assert "| round | new_labels | all_labels |" in report and "![proxy vs gold reward per round](plots/rounds.png)" \
        in report
    assert os.path.getsize(os.path.join(work, "plots", "rounds.png")) > 1000

    # a kill during round 2's helpfulness RM training: the manifest as it was then, the stage re-run from its own
    # checkpoint; everything after it (RS, eval) re-runs on the same inputs and gives the same figures
    interrupted = json.loads(open(os.path.join(work, "manifest.json")).read())
    after = ["round_2_rm_helpful", "round_2_rm_safety", "round_2_rs", "round_2_eval"]
    interrupted["stages"]["round_2_rm_helpful"] = {"commands_done": 0, "seconds": 0.0}
    for name in after[1:]:
        del interrupted["stages"][name]
    recipe.write_manifest(work, interrupted)
    resumed = recipe.run_recipe(config, work)["stages"]
    log = open(os.path.join(work, "round_2", "rm_helpful", "log.txt")).read()
    assert log.count("$ ") == 2  # the first run's command and the resumed one
    for name in after:
        assert resumed[name]["output"] == stages[name]["output"], name
    for name in after[:2]:
        assert resumed[name]["metrics"] == stages[name]["metrics"], name
    assert resumed["round_2_eval"]["metrics"] == stages["round_2_eval"]["metrics"]


def test_rounds_table_and_proxy_vs_gold_plot(tmp_path):
    stages = {}
    for k, (proxy, gold) in enumerate([(0.6, 0.5), (0.7, 0.45)], start=1):
        stages[f"round_{k}_pairs"] = {"metrics": {"new_labels": 8, "all_labels": 8 * k,
                                                  "rm_helpful_accuracy_before": 0.5 + 0.1 * k}}
        stages[f"round_{k}_eval"] = {"metrics": {"proxy_helpful_mean": proxy, "gold_helpful_mean": gold,
                                                 "win_rate_vs_sft": 0.25 * k}}
    rows = recipe_report.round_rows({"stages": stages})
    assert [(r["round"], r["all_labels"], r["gold_helpful_mean"], r["rm_safety_accuracy_before"]) for r in rows] == \
        [(1, 8, 0.5, None), (2, 16, 0.45, None)]
    (tmp_path / "plots").mkdir()
    lines = recipe_report.rounds_section(str(tmp_path), {"stages": stages})
    assert "| 2 | 8 | 16 | 0.7 | - | 0.7 | - | 0.45 | - | 0.5 |" in lines
    assert (tmp_path / "plots" / "rounds.png").stat().st_size > 1000
    assert recipe_report.rounds_section(str(tmp_path), {"stages": {}}) == []
