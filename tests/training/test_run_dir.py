"""A workdir belongs to one run (llama2_jax.training.run_dir, through llama2_jax.training.setup): WORKDIR/run.json
records the trainer that made it and what a resumed run must match; another trainer, another model, LoRA settings
that differ, or an init_from that is the workdir itself are refused with one line before anything is written, and a
new workdir stays empty until every check (fields, model, workdir, init_from, tokenizer, data) has passed.

Covers llama2_jax.training.setup."""

import json
import shutil

import pytest
from conftest import random_llama_params
from helpers.trainers import small_config

from configs import rm_tiny, sft_tiny
from llama2_jax.checkpoints.layout import RUN_FILE
from llama2_jax.checkpoints.params_io import save_params
from llama2_jax.training import run_dir
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.model_config import resolve_model_config
from llama2_jax.training.setup import setup
from train import pretrain, reward, sft


def snapshot(directory) -> dict:
    """Every file under `directory` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def refusal(train_and_evaluate, config, workdir) -> str:
    """The trainer's one-line ConfigError; nothing in `workdir` was written or changed."""
    before = snapshot(workdir) if workdir.exists() else None
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(config, str(workdir))
    assert "\n" not in str(error.value)
    assert (snapshot(workdir) if workdir.exists() else None) == before
    return str(error.value)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining workdir P as `train.pretrain` leaves it before its first step (run.json, llama_config.json, the
    tokenizer it trained on the corpus), with params of its model: nothing is compiled."""
    work = tmp_path_factory.mktemp("pretrain") / "P"
    run = setup(small_config(num_train_steps=2), str(work), pretrain.PRETRAIN)
    save_params(work, random_llama_params(run.model_cfg), run.model_cfg)
    return work


def dialogs(path):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(20)))
    return str(path)


def sft_config(init_from, data_path):
    config = sft_tiny.get_config()
    config.init_from, config.data.path, config.seq_len, config.batch_size = str(init_from), data_path, 32, 8
    return config


def test_the_workdir_records_its_trainer_and_model(pretrained):
    record = json.loads((pretrained / RUN_FILE).read_text())
    assert record["trainer"] == "pretrain" and record["lora"] is None
    assert record["model"] == json.loads((pretrained / "llama_config.json").read_text())
    assert record["config"]["num_train_steps"] == 2  # the config it ran with, for reference


def test_sft_with_the_workdir_as_its_own_init_from_is_refused(pretrained, tmp_path):
    """`train.sft --workdir=P --config.init_from=P` on a pretraining workdir once took it over: restored the
    pretraining state, deleted its checkpoints and rewrote llama_config.json."""
    config = sft_config(pretrained, dialogs(tmp_path / "d.jsonl"))
    assert refusal(sft.train_and_evaluate, config, pretrained) == (
        f"config.init_from is the workdir itself ({pretrained}): to resume that run pass only --workdir; to train "
        "from it, pass a new --workdir")
    config.init_from = str(pretrained) + "/"  # the same directory, spelled differently
    assert refusal(sft.train_and_evaluate, config, pretrained).startswith("config.init_from is the workdir itself")


def test_another_trainer_on_the_workdir_is_refused(pretrained, tmp_path):
    """`train.reward` on a pretraining workdir once rewrote its llama_config.json, then failed in the restore."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(20)))
    config = rm_tiny.get_config()
    config.data.path, config.seq_len, config.batch_size = str(pairs), 64, 8  # 64: max_seq_len would be raised
    config.init_from = str(shutil.copytree(pretrained, tmp_path / "copy"))  # P's model: only the trainer is wrong
    assert refusal(reward.train_and_evaluate, config, pretrained) == (
        f"{pretrained / RUN_FILE}: the workdir holds a pretrain run, not a reward run; use a new --workdir (to train "
        "from that run, pass it as config.init_from)")
    random_sft = sft_config("", dialogs(tmp_path / "d.jsonl"))  # not from P: only the trainer is wrong
    assert "holds a pretrain run, not a sft run" in refusal(sft.train_and_evaluate, random_sft, pretrained)


def test_a_resume_with_another_model_is_refused(pretrained):
    config = small_config(num_train_steps=4, **{"model.dim": 32})
    assert refusal(pretrain.train_and_evaluate, config, pretrained) == (
        f"{pretrained / RUN_FILE}: the workdir holds a run of another model (dim=64, hidden_dim=176) than this run's "
        "(dim=32, hidden_dim=96); resume with that model or use a new --workdir")


def test_a_data_error_leaves_a_new_workdir_empty(pretrained, tmp_path):
    """Data errors were found after llama_config.json and tokenizer.model had been written into a new workdir."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(dialogs(tmp_path / "d.jsonl")).read() + "not json\n")  # line 21
    message = refusal(sft.train_and_evaluate, sft_config(pretrained, str(bad)), tmp_path / "new")
    assert message.startswith(f"config.data: {bad}:21: ") and not (tmp_path / "new").exists()


def test_lora_and_full_runs_do_not_resume_each_other(tmp_path):
    model_cfg = resolve_model_config(small_config())
    lora_cfg = type("Lora", (), {"to_dict": lambda self: {"rank": 4}})()
    run_dir.write_workdir(str(tmp_path), run_dir.run_record("sft", model_cfg, None))
    with pytest.raises(ConfigError, match=r"holds a full fine-tuning run: resume without config.lora"):
        run_dir.check_workdir(str(tmp_path), run_dir.run_record("sft", model_cfg, lora_cfg))
    run_dir.write_workdir(str(tmp_path), run_dir.run_record("sft", model_cfg, lora_cfg), writes_model=False)
    with pytest.raises(ConfigError, match=r"holds a LoRA run: resume with its config.lora settings"):
        run_dir.check_workdir(str(tmp_path), run_dir.run_record("sft", model_cfg, None))
    other = type("Lora", (), {"to_dict": lambda self: {"rank": 8}})()
    with pytest.raises(ConfigError, match=r"holds a LoRA run with config.lora \{'rank': 4\}, not \{'rank': 8\}"):
        run_dir.check_workdir(str(tmp_path), run_dir.run_record("sft", model_cfg, other))
    run_dir.check_workdir(str(tmp_path), run_dir.run_record("sft", model_cfg, lora_cfg))  # the same: resumes


def test_a_ppo_resume_with_another_value_model_is_refused(tmp_path):
    model_cfg = resolve_model_config(small_config())
    run_dir.write_workdir(str(tmp_path), run_dir.run_record("ppo", model_cfg, None, {"value": model_cfg.to_dict()}),
                          writes_model=False)
    run_dir.check_workdir(str(tmp_path), run_dir.run_record("ppo", model_cfg, None, {"value": model_cfg.to_dict()}))
    other = {"value": model_cfg.replace(n_layers=4).to_dict()}  # value.init_from: a reward model of another size
    with pytest.raises(ConfigError, match=r"run.json: the workdir holds a run of other value settings than this "
                                          r"run's; resume with them or use a new --workdir$"):
        run_dir.check_workdir(str(tmp_path), run_dir.run_record("ppo", model_cfg, None, other))
