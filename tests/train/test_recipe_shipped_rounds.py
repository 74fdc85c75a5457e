"""configs/recipe_tiny.py as shipped runs the RLHF rounds (paper section 3.2): at least two rounds, so rejection
sampling runs at least twice and round 2 pools (and re-scores) round 1's answers. The rounds at reduced sizes run end
to end in tests/train/test_recipe_rounds.py (slow); the full shipped sizes are timed by hand (docs/recipe.md, Measured)."""

from configs import recipe_tiny
from train import recipe


def test_shipped_tiny_recipe_plans_its_rounds_with_a_pool_across_them():
    config = recipe_tiny.get_config()
    rounds = config.rlhf.rounds
    assert rounds >= 2
    planned = {p.name: p for p in recipe.plan(config)}
    assert [name for name in planned if name.endswith("_rs")] == [f"round_{k}_rs" for k in range(1, rounds + 1)]
    assert "rs" not in planned and "ppo" not in planned and list(planned)[-1] == "cd"
    assert f"round_{rounds}_ppo" in planned and not [name for name in planned if name.endswith("_gatt")]
    assert f"--config.init_from={{round_{rounds}_ppo}}" in planned["cd"].stage.commands[0]  # no GAtt: see the config
    for k in range(2, rounds + 1):
        rs = planned[f"round_{k}_rs"].stage.commands[0]
        assert f"--config.pool_from={{round_{k - 1}_rs}}/../pool.jsonl" in rs
        assert f"--config.first_iteration={k - 1}" in rs
        assert f"--config.reward.helpful_path={{round_{k}_rm_helpful}}" in rs


def test_a_stage_order_that_stops_before_the_rounds_runs_just_that_prefix():
    config = recipe_tiny.get_config()
    config.stage_order = "pretrain,sft,rm_helpful,rm_safety"
    assert [p.name for p in recipe.plan(config)] == ["pretrain", "sft", "rm_helpful", "rm_safety"]
    config.stage_order = "pretrain,sft,rm_helpful,rm_safety,rs"
    assert "round_2_rs" in [p.name for p in recipe.plan(config)]
