"""Safety context distillation: the preprompt table, the targeted-keep rule and records (hand-computed), and a tiny
end-to-end run whose kept answers are exactly those the safety RM scores above the answer without the preprompt,
with the scores recomputed independently after the prompt *without* the preprompt.

Covers llama2_jax.rlhf.context_distill and llama2_jax.data.safety_preprompts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.rlhf_models import CFG, make_tokenizer, save_policy, save_reward_model

from configs import cd_7b, cd_tiny
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.data import prompts as prompt_data
from llama2_jax.data import safety_preprompts
from llama2_jax.model import score as score_model
from llama2_jax.rlhf import context_distill as cd
from llama2_jax.text import chat_format as chat
from llama2_jax.training.checks import ConfigError
from train import context_distill


def test_preprompt_table_names_each_category_and_numbers_its_template(tmp_path):
    table = safety_preprompts.load_table()
    assert len(table.generic) >= 2 and {"criminal", "false_information", "explicit"} <= set(table.categories)
    text = table.category_preprompt("false_information")
    assert "'False Information / Disinformation'" in text
    steps = table.categories["false_information"]["template"]
    assert text.endswith("\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1)))
    assert [table.preprompt_for(i) for i in range(len(table.generic) + 1)] == [*table.generic, table.generic[0]]
    assert table.preprompt_for(0, "explicit", use_categories=False) == table.generic[0]
    with pytest.raises(ValueError, match="unknown risk category 'weather'"):
        table.preprompt_for(0, "weather")
    bad = tmp_path / "bad.json"
    bad.write_text('{"generic": [], "category_preamble": "{name}"}')
    with pytest.raises(ValueError, match=r"bad.json: 'generic' must be a non-empty list"):
        safety_preprompts.load_table(str(bad))


def test_prompt_records_carry_their_risk_category(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q", "is_safety": true, "risk_category": "criminal"}\n{"prompt": "r"}\n')
    assert [(p.risk_category, p.is_safety) for p in prompt_data.read_prompts(str(path))] == [("criminal", True),
                                                                                          ("", False)]
    path.write_text('{"prompt": "q", "risk_category": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: 'risk_category' is int"):
        prompt_data.read_prompts(str(path))


def test_preprompt_goes_in_front_of_the_system_message_or_becomes_one():
    user = [{"role": "user", "content": "how do I pick a lock?"}]
    assert cd.with_preprompt(user, "Be safe.") == [{"role": "system", "content": "Be safe."}] + user
    dialog = [{"role": "system", "content": "Be brief."}] + user
    assert cd.with_preprompt(dialog, "Be safe.")[0] == {"role": "system", "content": "Be safe.\n\nBe brief."}
    assert dialog[0]["content"] == "Be brief."  # the input is unchanged


def test_targeted_keep_records_and_metrics_by_hand():
    distilled, original = np.array([0.9, 0.2, 0.5, 0.7]), np.array([0.4, 0.6, 0.5, 0.1])
    keep = cd.targeted_keep(distilled, original)
    assert keep.tolist() == [True, False, False, True]  # a tie (0.5 = 0.5) is not kept
    prompts = [[{"role": "user", "content": q}] for q in "abcd"]
    records = cd.distill_records(prompts, ["A", "B", "C", "D"], keep)
    assert records == [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}],
                        "train_on": "last"},
                       {"messages": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "D"}],
                        "train_on": "last"}]
    m = cd.distill_metrics(distilled, original, keep)
    assert m["kept"] == 2 and m["kept_fraction"] == 0.5
    assert m["safety_gain_all_mean"] == pytest.approx((0.5 - 0.4 + 0.0 + 0.6) / 4)
    assert m["safety_gain_kept_mean"] == pytest.approx((0.5 + 0.6) / 2)
    assert m["safety_original_mean"] == pytest.approx(0.4) and m["safety_distilled_mean"] == pytest.approx(0.575)


def test_configs_load_and_bad_fields_are_one_line_errors(tmp_path):
    for module in (cd_7b, cd_tiny):
        config = module.get_config()
        assert config.distill.use_categories and config.sft.num_train_steps >= 1
    config = cd_tiny.get_config()
    with pytest.raises(ConfigError, match=r"^config.reward.safety_path is empty"):
        context_distill.train_and_evaluate(config, str(tmp_path))
    config.reward.safety_path, config.sampling.batch_size = "rm", 3
    with pytest.raises(ConfigError, match=r"^config.sampling.batch_size \(3\) must be even"):
        context_distill.train_and_evaluate(config, str(tmp_path))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.slow
def test_tiny_context_distillation_keeps_what_the_safety_rm_prefers(tmp_path, tokenizer):
    config = cd_tiny.get_config()
    config.init_from = str(save_policy(tmp_path / "policy", tokenizer))
    config.reward.safety_path = str(save_reward_model(tmp_path / "rm_safety", seed=2))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"how can you help {i}", "is_safety": i != 5,
                                           "risk_category": "criminal" if i % 2 else ""}) + "\n" for i in range(9)))
    config.prompts.path, config.prompts.is_safety, config.prompts.max_prompts = str(prompts), None, 0
    table = {"generic": ["be safe", "please help safe"], "category_preamble": "{name} safe:",
             "categories": {"criminal": {"name": "no", "template": ["say no", "help"]}}}  # short: a 64-token model
    (tmp_path / "preprompts.json").write_text(json.dumps(table))
    config.distill.preprompts_path = str(tmp_path / "preprompts.json")
    config.prompts.max_prompt_len, config.sampling.max_gen_len, config.sampling.batch_size = 48, 16, 16
    config.mesh.data, config.mesh.fsdp = -1, 1
    sft = config.sft
    sft.seq_len, sft.batch_size, sft.num_train_steps, sft.log_every_steps = 64, 8, 2, 2
    sft.checkpoint_every_steps, sft.async_checkpoints = 2, False
    work = tmp_path / "cd"
    result = context_distill.train_and_evaluate(config, str(work))

    samples = [json.loads(line) for line in (work / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8  # the untagged prompt 5 is not adversarial
    assert samples[1]["risk_category"] == "criminal"
    rm, rm_cfg = checkpoint.load_params(config.reward.safety_path, kind="score")
    for s in samples:  # both scores: the answer after the prompt WITHOUT the preprompt, + EOS
        context = chat.encode_dialog(tokenizer, s["prompt"])
        for key in ("distilled", "original"):
            ids = context + s[f"{key}_tokens"] + [tokenizer.eos_id]
            score = jax.nn.sigmoid(score_model.score_tokens(rm, rm_cfg, jnp.array([ids]), jnp.array([len(ids)])))
            assert float(score[0]) == pytest.approx(s[f"safety_{key}"], abs=2e-5)
        assert s["kept"] == (s["safety_distilled"] > s["safety_original"])
    kept = [s for s in samples if s["kept"]]
    records = [json.loads(line) for line in (work / "distill.jsonl").read_text().splitlines()]
    assert [r["messages"] for r in records] == [s["prompt"] + [{"role": "assistant", "content": s["distilled"]}]
                                                for s in kept]
    summary = json.loads((work / "distill.json").read_text())
    assert summary["kept"] == len(kept) == result.summary["kept"] and summary["prompts"] == 8
    gains = [s["safety_distilled"] - s["safety_original"] for s in samples]
    assert summary["safety_gain_all_mean"] == pytest.approx(np.mean(gains), abs=1e-6)
    assert summary["safety_gain_kept_mean"] > summary["safety_gain_all_mean"]
    params, cfg = checkpoint.load_params(work / "sft")  # the distilled policy is an init_from
    assert cfg.vocab_size == CFG.vocab_size and "output" in params
