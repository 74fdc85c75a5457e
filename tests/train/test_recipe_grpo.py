"""train.recipe's optional grpo stage (fast): it starts from the latest policy ({policy}) in place of PPO or after it,
GAtt continues from its product ({ppo} is provided by it), a re-run skips it or re-runs only it, and the RLHF rounds
refuse it. The stages here are a stand-in module that records its command line (the real trainers are tested in
tests/train/test_grpo_trainer.py and tests/train/test_recipe.py)."""

import json
import sys

import pytest

from configs import recipe_7b, recipe_common, recipe_tiny
from train import recipe

STAND_IN = '''import json, os, sys
workdir = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workdir=")][0]
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "argv.json"), "w") as f:
    json.dump(sys.argv[1:], f)
with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    for step, reward in ((1, 0.25), (2, 0.5)):
        f.write(json.dumps({"step": step, "reward_combined_mean": reward, "reward_mean": 0.0}) + "\\n")
    f.write(json.dumps({"step": 2, "eval_reward_combined_mean": 0.75, "eval_reward_mean": 0.0}) + "\\n")
'''


def stand_in_recipe(order: str):
    """recipe_tiny's stage kinds and placeholders, each command the stand-in module: `stand_in --workdir={dir}
    --init_from=<the real stage's init_from placeholder>`."""
    config = recipe_tiny.get_config()
    config.stage_order, config.eval.piqa_path, config.python = order, "", sys.executable
    config.rlhf.rounds = 0  # the one RLHF pass, where the optional grpo stage runs (the rounds refuse it)
    init_from = {"sft": "", "rs": "{sft}", "ppo": "{rs}", "grpo": "{policy}", "gatt": "{ppo}"}
    for name, source in init_from.items():
        stage = config.stages[name]
        stage.commands = (f"stand_in --workdir={{dir}} --init_from={source}",)
        stage.output = "."
    return config


def started_from(workdir, stage: str) -> str:
    argv = json.loads((workdir / stage / "argv.json").read_text())
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--init_from="))


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "stand_in.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "modules"))
    return tmp_path / "recipe"


def test_grpo_is_declared_but_off_by_default_and_starts_from_the_latest_policy():
    for module in (recipe_tiny, recipe_7b):
        config = module.get_config()
        assert "grpo" not in recipe.stage_names(config) and "grpo" in recipe_common.OPTIONAL_STAGES
        assert config.stages.grpo.kind == "grpo" and config.stages.grpo.provides == "ppo"
        argv = recipe.stage_commands(config, "grpo", {"data": "/d", "workdir": "/w", "dir": "/w/grpo",
                                                      "policy": "/w/rs/iter_0/sft", "rm_helpful": "/w/rm_h",
                                                      "rm_safety": "/w/rm_s",
                                                      "paths": recipe_tiny.get_config().paths})[0]
        assert argv[1:3] == ["-m", "train.grpo"] and "--config.init_from=/w/rs/iter_0/sft" in argv
        assert "--config.reward.helpful_path=/w/rm_h" in argv and "--config.reward.safety_path=/w/rm_s" in argv
    assert "--config=configs/grpo_rm_tiny.py" in recipe_tiny.get_config().stages.grpo.commands[0]


def test_grpo_in_place_of_ppo_then_gatt_continues_from_it_and_a_rerun_skips_it(stand_in, capsys):
    recipe.run_recipe(stand_in_recipe("sft,rs,grpo,gatt"), str(stand_in))
    assert started_from(stand_in, "grpo") == str(stand_in / "rs")
    assert started_from(stand_in, "gatt") == str(stand_in / "grpo")  # {ppo} is the GRPO policy
    manifest = json.loads((stand_in / "manifest.json").read_text())
    assert manifest["stages"]["grpo"]["metrics"] == {
        "iterations": 2, "reward": "reward_combined_mean", "first_reward": 0.25, "last_reward": 0.5,
        "first_eval_reward": 0.75, "last_eval_reward": 0.75, "first_eval_iteration": 2, "last_eval_iteration": 2}
    assert "## grpo" in (stand_in / "REPORT.md").read_text()

    capsys.readouterr()
    recipe.run_recipe(stand_in_recipe("sft,rs,grpo,gatt"), str(stand_in))  # everything finished: all skipped
    assert capsys.readouterr().out.count("finished earlier: skipped") == 4

    del manifest["stages"]["grpo"]["finished"]  # as if killed during its evaluation: only grpo runs again
    (stand_in / "manifest.json").write_text(json.dumps(manifest))
    (stand_in / "gatt" / "argv.json").unlink()
    recipe.run_recipe(stand_in_recipe("sft,rs,grpo,gatt"), str(stand_in))
    out = capsys.readouterr().out
    assert "[grpo] done" in out and out.count("finished earlier: skipped") == 3
    assert not (stand_in / "gatt" / "argv.json").exists()  # gatt was skipped, its recorded input is the GRPO policy
    assert json.loads((stand_in / "manifest.json").read_text())["stages"]["grpo"]["finished"]


def test_grpo_after_ppo_starts_from_the_ppo_policy(stand_in):
    recipe.run_recipe(stand_in_recipe("sft,rs,ppo,grpo,gatt"), str(stand_in))
    assert started_from(stand_in, "ppo") == str(stand_in / "rs")
    assert started_from(stand_in, "grpo") == str(stand_in / "ppo")
    assert started_from(stand_in, "gatt") == str(stand_in / "grpo")


def test_grpo_with_rlhf_rounds_is_a_one_line_error():
    config = recipe_tiny.get_config()
    config.rlhf.rounds = 2
    config.stage_order = "pretrain,sft,rm_helpful,rm_safety,rs,grpo,gatt,cd"
    with pytest.raises(recipe.RecipeError, match=r"^config.stage_order names grpo, which the RLHF rounds"):
        recipe.plan(config)
