"""train.recipe: placeholders, products and one-line errors (fast), and a shortened recipe end to end (slow): every
stage runs as its own process, the manifest records them, REPORT.md has a table and a plot per stage, a re-run skips
everything, and an interrupted stage is re-run alone.

Covers llama2_jax.evaluation.recipe_report."""

import json
import os
import types

import pytest
from conftest import shared_file
from helpers.recipe import short_recipe

from configs import recipe_7b, recipe_common, recipe_tiny
from llama2_jax.evaluation import recipe_report
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
            assert config.stages[name].commands
            assert config.stages[name].kind in ("lm", "rm", "rs", "ppo", "cd", "gatt")
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


def test_piqa_command_and_figures(tmp_path):
    config = recipe_tiny.get_config()
    assert config.eval.piqa_path and "rm_helpful" not in recipe.piqa_stages(config)
    assert recipe.piqa_stages(recipe_7b.get_config()) == []  # no PIQA file named: no evaluation
    data, checkpoint = tmp_path / "piqa.jsonl", tmp_path / "sft"
    data.write_text("{}\n")
    config.eval.piqa_path, config.eval.flags = "{data}/piqa.jsonl", "--dtype=float32"
    with pytest.raises(recipe.RecipeError, match=r"has no tokenizer.model to evaluate PIQA with"):
        recipe.piqa_command(config, {"data": str(tmp_path)}, str(checkpoint), "/out")
    checkpoint.mkdir()
    (checkpoint / "tokenizer.model").write_bytes(b"")
    argv = recipe.piqa_command(config, {"data": str(tmp_path)}, str(checkpoint), "/out")
    assert argv[1:] == ["-m", "llama2_jax.evaluate", f"--checkpoint={checkpoint}",
                        f"--tokenizer={checkpoint}/tokenizer.model", "--tasks=piqa_local", "--num_fewshot=0",
                        "--metadata", f"piqa_path={data}", "--batch_size=16", "--output_path=/out", "--limit=200",
                        "--dtype=float32"]
    config.eval.stages = "sft,dpo"
    with pytest.raises(recipe.RecipeError, match=r"^config.eval.stages names unknown stages \['dpo'\]"):
        recipe.piqa_stages(config)
    config.eval.piqa_path = "{data}/missing.jsonl"
    with pytest.raises(recipe.RecipeError, match=r"^config.eval.piqa_path: no such file .*missing.jsonl"):
        recipe.piqa_command(config, {"data": str(tmp_path)}, str(checkpoint), "/out")

    out = tmp_path / "out"
    assert recipe_report.piqa_figures(str(out)) == {}
    (out / "llama2_jax").mkdir(parents=True)
    results = {"results": {"piqa_local": {"alias": "piqa_local", "acc,none": 0.5, "acc_stderr,none": 0.11,
                                          "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.1}},
               "n-samples": {"piqa_local": {"original": 1838, "effective": 20}}}
    (out / "llama2_jax" / "results_2026-12-02T01-00-00.json").write_text(json.dumps(results))
    assert recipe_report.piqa_figures(str(out)) == {"piqa_acc": 0.5, "piqa_acc_stderr": 0.11, "piqa_acc_norm": 0.6,
                                                    "piqa_acc_norm_stderr": 0.1, "piqa_questions": 20}


def test_a_failing_stage_is_one_line_naming_its_log(tmp_path):
    config = recipe_tiny.get_config()
    config.stage_order = "pretrain"
    config.stages.pretrain.extra = "--config.no_such_field=1"
    with pytest.raises(recipe.RecipeError, match=r"^exit status \d+ from `train.pretrain .*`; see .*pretrain/log.txt"):
        recipe.run_recipe(config, str(tmp_path))
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["pretrain"]["commands_done"] == 0


@pytest.mark.slow
def test_shipped_tiny_recipe_evaluates_its_pretrained_model_on_piqa(tmp_path):
    """configs/recipe_tiny.py as shipped (200 PIQA questions, its eval flags) after a 4-step pretraining: its first
    evaluation once stopped the recipe ("a continuation of 193 tokens does not fit max_seq_len 128")."""
    config = recipe_tiny.get_config()
    config.data_dir = os.path.dirname(shared_file("piqa-valid-with-labels.jsonl"))
    config.rlhf.rounds = 0  # only the pretraining stage runs (the rounds: tests/train/test_recipe_rounds.py)
    config.stage_order = "pretrain"
    config.stages.pretrain.extra = "--config.num_train_steps=4 --config.eval_every_steps=4"
    metrics = recipe.run_recipe(config, str(tmp_path))["stages"]["pretrain"]["metrics"]
    assert metrics["piqa_questions"] == 200 and 0 <= metrics["piqa_acc"] <= 1


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
    for name in recipe_common.STAGES:  # lm-eval's PIQA on the products of config.eval.stages
        if name in ("pretrain", "cd"):
            metrics = stages[name]["metrics"]
            assert 0 <= metrics["piqa_acc_norm"] <= 1 and metrics["piqa_questions"] == 20, name
            assert list((tmp_path / "recipe" / name / "piqa").glob("*/results_*.json")), name
        else:
            assert "piqa_acc" not in stages[name]["metrics"], name
    report = (tmp_path / "recipe" / "REPORT.md").read_text()
    for name in recipe_common.STAGES:
        assert f"## {name}\n" in report
        assert (tmp_path / "recipe" / "plots" / f"{name}.png").stat().st_size > 1000, name
        assert f"](plots/{name}.png)" in report
    assert "| eval_accuracy |" in report and "| kept_fraction |" in report and "| piqa_acc_norm |" in report

    sizes = log_sizes(work)
    again = recipe.run_recipe(config, work)  # every stage finished: nothing runs
    assert log_sizes(work) == sizes and again["stages"] == stages

    interrupted = json.loads((tmp_path / "recipe" / "manifest.json").read_text())
    interrupted["stages"]["cd"] = {"commands_done": 0, "seconds": 0.0}  # as if killed during the last stage
    recipe.write_manifest(work, interrupted)
    resumed = recipe.run_recipe(config, work)
    grown = {name for name, size in log_sizes(work).items() if size != sizes[name]}
    assert grown == {"cd"} and resumed["stages"]["cd"]["finished"]
    assert resumed["stages"]["cd"]["metrics"] == stages["cd"]["metrics"]  # resumed from its finished checkpoints
