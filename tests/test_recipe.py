"""train.recipe: placeholders, products and one-line errors (fast), and a shortened recipe end to end (slow): every
stage runs as its own process, the manifest records them, REPORT.md has a table and a plot per stage, a re-run skips
everything, and an interrupted stage is re-run alone."""

import json
import os
import types

import pytest

from configs import recipe_7b, recipe_common, recipe_tiny
from conftest import shared_file
from train import recipe


def values(**products):
    base = {"data": "/data", "workdir": "/w", "dir": "/w/stage", **products}
    base["paths"] = types.SimpleNamespace(sft_data="/data/a.json")
    return base


def test_configs_list_every_stage_in_order_with_a_command_each():
    for module in (recipe_tiny, recipe_7b):
        config = module.get_config()
        assert recipe.stage_names(config) == list(recipe_common.STAGES)
        for name in recipe_common.STAGES:
            assert config.stages[name].commands and config.stages[name].kind in ("lm", "rm", "rs", "ppo", "cd")
    assert "configs/ppo_7b.py" in recipe_7b.get_config().stages.ppo.commands[0]


def test_commands_fill_placeholders_and_name_a_missing_product():
    config = recipe_tiny.get_config()
    argv = recipe.stage_commands(config, "sft", values(pretrain="/w/pretrain"))[0]
    assert argv[1:4] == ["-m", "train.sft", "--config=configs/sft_tiny.py"]
    assert "--config.init_from=/w/pretrain" in argv and "--config.data.path=/data/a.json" in argv
    config.stages.sft.extra = "--config.num_train_steps=3"
    assert recipe.stage_commands(config, "sft", values(pretrain="/p"))[0][-1] == "--config.num_train_steps=3"
    with pytest.raises(recipe.RecipeError, match=r"^config.stages.sft: \{pretrain\} is not a finished stage"):
        recipe.stage_commands(config, "sft", values())
    config.stage_order = "pretrain,dpo"
    with pytest.raises(recipe.RecipeError, match=r"unknown stages \['dpo'\]"):
        recipe.stage_names(config)


def test_product_is_the_first_existing_alternative(tmp_path):
    assert recipe.product(str(tmp_path), "best|.") == str(tmp_path)
    (tmp_path / "best").mkdir()
    assert recipe.product(str(tmp_path), "best|.") == str(tmp_path / "best")
    with pytest.raises(recipe.RecipeError, match="none of the stage's products exists"):
        recipe.product(str(tmp_path), "iter_0/sft")


def test_a_failing_stage_is_one_line_naming_its_log(tmp_path):
    config = recipe_tiny.get_config()
    config.stage_order = "pretrain"
    config.stages.pretrain.extra = "--config.no_such_field=1"
    with pytest.raises(recipe.RecipeError, match=r"^exit status \d+ from `train.pretrain .*`; see .*pretrain/log.txt"):
        recipe.run_recipe(config, str(tmp_path))
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["pretrain"]["commands_done"] == 0


def short_recipe():
    """recipe_tiny with a 2-layer, 64-wide model and a few steps per stage."""
    config = recipe_tiny.get_config()
    config.data_dir = os.path.dirname(shared_file("oasst-en-100-pairs.jsonl"))
    ckpt = "--config.checkpoint_every_steps=2 --config.eval_every_steps=2 --config.eval_batches=1"
    config.stages.pretrain.extra = ("--config.num_train_steps=4 --config.model.dim=64 --config.model.n_layers=2 "
                                    f"--config.model.n_heads=4 --config.model.n_kv_heads=4 --config.batch_size=8 "
                                    f"{ckpt}")
    config.stages.sft.extra = f"--config.num_train_steps=2 --config.seq_len=128 {ckpt}"
    for name in ("rm_helpful", "rm_safety"):
        config.stages[name].extra = f"--config.num_train_steps=2 --config.seq_len=128 --config.batch_size=8 {ckpt}"
    config.stages.rs.extra = ("--config.prompts.max_prompts=4 --config.sampling.num_samples=2 "
                              "--config.sampling.batch_size=8 --config.sampling.max_gen_len=8 "
                              "--config.sft.num_train_steps=2 --config.sft.checkpoint_every_steps=2")
    config.stages.ppo.extra = ("--config.iterations=4 --config.prompts.max_prompts=40 --config.batch_size=8 "
                               "--config.minibatch_size=8 --config.sampling.max_gen_len=8")
    config.stages.gatt.extra = f"--config.num_train_steps=2 --config.seq_len=128 {ckpt}"
    config.stages.cd.extra = ("--config.prompts.max_prompts=4 --config.sampling.batch_size=8 "
                              "--config.sampling.max_gen_len=8 --config.sft.num_train_steps=2 "
                              "--config.sft.checkpoint_every_steps=2 --config.sft.seq_len=128 "
                              "--config.prompts.max_prompt_len=112")  # + 8 new tokens <= the 128-token model
    return config


def log_sizes(workdir):
    return {name: os.path.getsize(os.path.join(workdir, name, "log.txt")) for name in recipe_common.STAGES}


@pytest.mark.slow
def test_short_recipe_end_to_end_report_and_skip_on_rerun(tmp_path):
    config, work = short_recipe(), str(tmp_path / "recipe")
    manifest = recipe.run_recipe(config, work)

    stages = manifest["stages"]
    assert list(stages) == list(recipe_common.STAGES) and all(s["finished"] for s in stages.values())
    assert stages["rs"]["output"].endswith("rs/iter_0/sft") and stages["cd"]["output"].endswith("cd/sft")
    assert stages["pretrain"]["metrics"]["steps"] == 4 and stages["pretrain"]["metrics"]["eval_loss"] > 0
    assert 0 <= stages["rm_safety"]["metrics"]["eval_accuracy"] <= 1
    assert stages["ppo"]["metrics"]["evaluations"] == 2 and stages["ppo"]["output"].endswith("ppo/best")
    assert 0 <= stages["cd"]["metrics"]["kept_fraction"] <= 1
    report = (tmp_path / "recipe" / "REPORT.md").read_text()
    for name in recipe_common.STAGES:
        assert f"## {name}\n" in report
        assert (tmp_path / "recipe" / "plots" / f"{name}.png").stat().st_size > 1000, name
        assert f"](plots/{name}.png)" in report
    assert "| eval_accuracy |" in report and "| kept_fraction |" in report

    sizes = log_sizes(work)
    again = recipe.run_recipe(config, work)  # every stage finished: nothing runs
    assert log_sizes(work) == sizes and again["stages"] == stages

    interrupted = json.loads((tmp_path / "recipe" / "manifest.json").read_text())
    interrupted["stages"]["cd"] = {"commands_done": 0, "seconds": 0.0}  # as if killed during the last stage
    recipe.write_manifest(work, interrupted)
    resumed = recipe.run_recipe(config, work)
    grown = {name for name, size in log_sizes(work).items() if size != sizes[name]}
    assert grown == {"cd"} and resumed["stages"]["cd"]["finished"]
    assert resumed["stages"]["cd"]["metrics"]["kept_fraction"] == stages["cd"]["metrics"]["kept_fraction"]
