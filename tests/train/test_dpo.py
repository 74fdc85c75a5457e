"""DPO: the loss family by hand, the reference model frozen in the shared step, pair batches with prompt lengths,
and train.dpo end to end (held-out implicit-reward accuracy on Anthropic HH pairs)."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.data import rm as rm_data
from llama2_jax.training import losses
from llama2_jax.training import state as train_state
from llama2_jax.training.checks import ConfigError

V = 3


class UnigramModel:
    """A stand-in model: every position's logits are params["logits"] [V] (so log p(token) = log_softmax[token])."""
    calls = 0

    def apply(self, variables, inputs):
        UnigramModel.calls += 1
        logits = variables["params"]["logits"]
        return jnp.broadcast_to(logits, inputs.shape + (logits.shape[-1],))


def log_softmax(values):
    z = math.log(sum(math.exp(v) for v in values))
    return [v - z for v in values]


POLICY = [-0.5, 0.4, 0.9]  # prefers the chosen tokens 2, 1 over token 0 more than REFERENCE does
REFERENCE = [0.0, 0.1, -0.4]
# One pair: prompt = 2 tokens; chosen response = tokens 2, 1 (length 4); rejected response = token 0 (length 3).
BATCH = {"tokens": np.asarray([[[1, 1, 2, 1], [1, 1, 0, 0]]], np.int32),
         "lengths": np.asarray([[4, 3]], np.int32), "prompt_lens": np.asarray([[2, 2]], np.int32),
         "valid": np.ones((1,), np.float32)}


def hand_log_ratios(average: bool):
    lp, lr = log_softmax(POLICY), log_softmax(REFERENCE)
    chosen = (lp[2] + lp[1]) - (lr[2] + lr[1])
    rejected = lp[0] - lr[0]
    if average:
        chosen, rejected = chosen / 2, rejected / 1
    return chosen, rejected


def run_loss(loss_type, beta, label_smoothing=0.0):
    params = {"logits": jnp.asarray(POLICY)}
    frozen = {"logits": jnp.asarray(REFERENCE)}
    return losses.dpo_loss(params, BATCH, frozen, model=UnigramModel(), beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing)


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                      ("ipo", 0.1, 0.0), ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0)])
def test_loss_equals_hand_computed_value(loss_type, beta, smoothing):
    chosen, rejected = hand_log_ratios(average=loss_type == "ipo")
    h = chosen - rejected
    expected = {
        "sigmoid": -(1 - smoothing) * math.log(1 / (1 + math.exp(-beta * h)))
                   - smoothing * math.log(1 / (1 + math.exp(beta * h))),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - beta * h),
    }[loss_type]
    loss_sum, aux = run_loss(loss_type, beta, smoothing)
    assert float(loss_sum) == pytest.approx(expected, rel=1e-5)
    assert float(aux["weight"]) == 1.0
    assert float(aux["rewards_chosen"]) == pytest.approx(beta * chosen, rel=1e-5)
    assert float(aux["rewards_rejected"]) == pytest.approx(beta * rejected, rel=1e-5)
    assert float(aux["reward_margin"]) == pytest.approx(beta * h, rel=1e-5)
    assert float(aux["reward_accuracy"]) == float(chosen > rejected)


def test_hinge_is_zero_past_the_margin():
    # beta * h >= 1 -> no loss
    chosen, rejected = hand_log_ratios(average=False)
    assert chosen > rejected
    beta = 1.0 / (chosen - rejected) + 0.5
    assert float(run_loss("hinge", beta)[0]) == 0.0


def test_padding_pairs_and_padding_tokens_do_not_count():
    padded = {k: np.concatenate([v, v * 0 + (1 if k in ("lengths", "prompt_lens") else 0)]) for k, v in BATCH.items()}
    padded["tokens"] = np.concatenate([BATCH["tokens"], np.zeros_like(BATCH["tokens"])])
    params, frozen = {"logits": jnp.asarray(POLICY)}, {"logits": jnp.asarray(REFERENCE)}
    one = losses.dpo_loss(params, BATCH, frozen, model=UnigramModel(), beta=0.1)
    two = losses.dpo_loss(params, padded, frozen, model=UnigramModel(), beta=0.1)
    assert float(two[1]["weight"]) == 1.0
    assert float(two[0]) == pytest.approx(float(one[0]), rel=1e-6)
    # tokens after `lengths` change nothing
    noisy = {**BATCH, "tokens": BATCH["tokens"].copy()}
    noisy["tokens"][0, 1, 3] = 2  # beyond the rejected row's length 3
    assert float(losses.dpo_loss(params, noisy, frozen, model=UnigramModel(), beta=0.1)[0]) == \
        pytest.approx(float(one[0]), rel=1e-6)


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        run_loss("kto", 0.1)


def test_reference_is_computed_once_per_batch_and_never_receives_gradients():
    """Through the shared jitted step: one policy and one reference forward per (micro-)batch trace, zero gradient
    w.r.t. the reference, the reference unchanged and still usable after the (donating) step."""
    model = UnigramModel()
    loss_fn = functools.partial(losses.dpo_loss, model=model, beta=0.1)
    params, frozen = {"logits": jnp.asarray(POLICY)}, {"logits": jnp.asarray(REFERENCE)}
    grad_frozen = jax.grad(lambda f: loss_fn(params, BATCH, f)[0])(frozen)
    assert float(jnp.abs(grad_frozen["logits"]).max()) == 0.0

    tx = train_state.make_optimizer(1e-2, weight_decay=0.0, grad_clip=0.0)
    state = train_state.TrainState.create(jax.tree.map(jnp.copy, params), tx)  # its buffers are donated
    UnigramModel.calls = 0
    step = jax.jit(functools.partial(train_state.train_step, loss_fn=loss_fn), donate_argnums=0)
    new_state, metrics = step(state, BATCH, frozen)
    assert UnigramModel.calls == 2  # traced once: one policy forward, one reference forward
    np.testing.assert_array_equal(np.asarray(frozen["logits"]), np.asarray(REFERENCE, np.float32))
    assert not np.allclose(np.asarray(new_state.params["logits"]), np.asarray(POLICY, np.float32))
    # The step's gradient is the policy gradient alone: equal to differentiating with the reference as a constant.
    expected = jax.grad(lambda p: loss_fn(p, BATCH, frozen)[0])(params)
    manual = train_state.TrainState.create(params, tx)
    updates, _ = tx.update(expected, manual.opt_state, params)
    np.testing.assert_allclose(np.asarray(new_state.params["logits"]),
                               np.asarray(params["logits"] + updates["logits"]), rtol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(run_loss("sigmoid", 0.1)[0]), rel=1e-6)


def test_gradient_accumulation_with_a_frozen_tree_is_exact():
    model = UnigramModel()
    loss_fn = functools.partial(losses.dpo_loss, model=model, beta=0.5)
    batch = {k: np.concatenate([v, v]) for k, v in BATCH.items()}
    batch["tokens"][1, 0, 3] = 0  # a second, different pair
    params, frozen = {"logits": jnp.asarray(POLICY)}, {"logits": jnp.asarray(REFERENCE)}
    tx = train_state.make_optimizer(1e-2, weight_decay=0.0, grad_clip=0.0)
    outs = [train_state.train_step(train_state.TrainState.create(params, tx), batch, frozen, loss_fn=loss_fn,
                                   grad_accum_steps=n) for n in (1, 2)]
    np.testing.assert_allclose(np.asarray(outs[0][0].params["logits"]), np.asarray(outs[1][0].params["logits"]),
                               rtol=1e-6)
    assert float(outs[0][1]["loss"]) == pytest.approx(float(outs[1][1]["loss"]), rel=1e-6)


def test_pair_batches_carry_the_prompt_length_of_both_sequences():
    class Tok:
        bos_id = 1

    prompt, chosen, rejected = [1, 5, 6, 7, 8, 9], [10, 11, 12], [13]
    (c, r), cut, _ = rm_data.truncate_pair(prompt, [chosen, rejected], max_len=7, bos_id=Tok.bos_id)
    n_prompt = rm_data.kept_prompt_len(len(prompt), 3, 7)
    assert cut and c[n_prompt:] == chosen and r[n_prompt:] == rejected and c[:n_prompt] == r[:n_prompt]
    assert rm_data.kept_prompt_len(len(prompt), 1, 7) == len(prompt)
    row = rm_data.pair_row(rm_data.EncodedPair(np.asarray(c), np.asarray(r), -1, n_prompt), max_len=8)
    assert row["prompt_lens"].tolist() == [n_prompt, n_prompt] and row["lengths"].tolist() == [7, 5]


# ------------------------------------------------------------------------------------------------------ end to end

def write_pairs(path, n):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):  # a learnable rule: the chosen answer is polite
            f.write(json.dumps({"prompt": f"question {i} why the cat", "chosen": "yes please thanks",
                                "rejected": "no " + "dog " * int(rng.integers(1, 4))}) + "\n")
    return path


def test_configs_load_and_bad_fields_name_the_field():
    from configs import dpo_7b, dpo_tiny
    from train import dpo

    for module in (dpo_7b, dpo_tiny):
        config = module.get_config()
        config.init_from, config.data.path = "sft", "pairs.jsonl"
        dpo.check_fields(config)
    config = dpo_7b.get_config()
    assert (config.dpo.beta, config.batch_size, config.learning_rate) == (0.1, 64, 1e-6)
    for field, value, message in [("dpo.loss_type", "kto", r"^config.dpo.loss_type='kto'; known: sigmoid, ipo"),
                                  ("dpo.beta", 0.0, r"^config.dpo.beta=0.0 must be > 0"),
                                  ("data.path", "", r"^config.data.path")]:
        config = dpo_tiny.get_config()
        config.init_from, config.data.path = "sft", "pairs.jsonl"
        section, _, name = field.rpartition(".")
        (config[section] if section else config)[name] = value
        with pytest.raises(ConfigError, match=message):
            dpo.check_fields(config)
    config = dpo_tiny.get_config()
    config.data.path = "pairs.jsonl"
    with pytest.raises(ConfigError, match=r"^config.init_from is empty"):
        dpo.train_and_evaluate(config, "/nonexistent/never-written")


@pytest.mark.slow
def test_train_and_evaluate_end_to_end_learns_the_preference(tmp_path):
    import flax.linen as nn

    from configs import dpo_tiny
    from llama2_jax.checkpoints.params_io import save_params
    from llama2_jax.model.config import LlamaConfig
    from llama2_jax.model.llama import Llama
    from llama2_jax.text.tokenizer import train_tokenizer
    from train import dpo

    cfg = LlamaConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                      dtype="float32")
    words = "the a cat dog safe help answer question please thanks why how what no yes sorry can you I".split()
    rng = np.random.default_rng(0)
    tokenizer = train_tokenizer([" ".join(rng.choice(words, size=12)) + f" {i}." for i in range(400)],
                                tmp_path / "spm", cfg.vocab_size)
    params = jax.jit(lambda r: nn.unbox(Llama(cfg).init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.PRNGKey(0))
    save_params(tmp_path / "sft", params, cfg)
    (tmp_path / "sft" / "tokenizer.model").write_bytes(open(tokenizer.model_path, "rb").read())

    config = dpo_tiny.get_config()
    config.init_from, config.data.path = str(tmp_path / "sft"), str(write_pairs(tmp_path / "pairs.jsonl", 80))
    config.mesh.fsdp, config.mesh.data = -1, 1  # the 8 simulated devices
    config.batch_size, config.seq_len = 8, 32
    config.num_epochs, config.num_train_steps, config.eval_every_steps = 0.0, 8, 4
    config.learning_rate, config.warmup_steps, config.async_checkpoints, config.progress_bar = 3e-3, 1, False, False
    result = dpo.train_and_evaluate(config, str(tmp_path / "dpo"))
    state, history = result.state, result.history

    evals = [h for h in history if "eval_reward_accuracy" in h]
    assert [h["step"] for h in evals] == [4, 8] and int(state.step) == 8
    assert evals[-1]["eval_reward_accuracy"] == 1.0 and evals[-1]["eval_reward_margin"] > 0
    assert evals[-1]["eval_loss"] < math.log(2)  # below the loss at the reference (h = 0)
    train_rows = [h for h in history if "rewards_chosen" in h and "eval_loss" not in h]
    assert {"rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin"} <= set(train_rows[-1])
    summary = json.loads((tmp_path / "dpo" / "dpo_eval.json").read_text())
    assert summary["reward_accuracy"] == evals[-1]["eval_reward_accuracy"] and summary["eval_pairs"] == 8


@pytest.mark.slow
def test_tiny_dpo_from_a_tiny_sft_policy_learns_hh_preferences(tmp_path):
    """SFT a tiny model on Alpaca, then DPO it on Anthropic HH harmless pairs: held-out implicit-reward accuracy
    (231 pairs) rises above 0.55 (the reference policy itself scores 0: its rewards are all 0, ties count as wrong)."""
    from conftest import shared_file

    from configs import dpo_tiny, sft_tiny
    from llama2_jax.data.preferences import read_preferences
    from llama2_jax.text.tokenizer import train_tokenizer
    from train import dpo, sft

    hh = shared_file("hh-rlhf-harmless-base-test.prompt-chosen-rejected.jsonl")
    alpaca = shared_file("alpaca-cleaned-first1000.json")
    records = json.loads(alpaca.read_text())[:400]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    pairs, _ = read_preferences(str(hh))
    texts = [r["instruction"] + "\n" + r["output"] for r in records]
    texts += [m["content"] for p in pairs[:800] for m in p.prompt] + [p.chosen for p in pairs[:800]]
    tokenizer = train_tokenizer(texts + ["[INST] <<SYS>> [/INST]"], tmp_path / "tok", vocab_size=1024,
                                num_threads=1)

    config = sft_tiny.get_config()
    config.model.vocab_size, config.model.dim, config.model.n_layers = 1024, 64, 2
    config.model.n_heads, config.model.n_kv_heads, config.model.max_seq_len = 4, 2, 256
    config.tokenizer.path, config.data.path = tokenizer.model_path, str(tmp_path / "alpaca.json")
    config.seq_len, config.batch_size, config.num_epochs, config.num_train_steps = 128, 16, 0.0, 60
    config.learning_rate, config.warmup_steps, config.eval_every_steps = 3e-3, 5, 60
    config.progress_bar, config.sample_prompts, config.async_checkpoints = False, (), False
    sft.train_and_evaluate(config, str(tmp_path / "sft"))

    config = dpo_tiny.get_config()
    config.init_from, config.data.path = str(tmp_path / "sft"), str(hh)
    # 256 tokens: at 128, half of the HH responses lose their end (and EOS) to truncation and accuracy stays ~0.55
    config.seq_len, config.batch_size, config.num_epochs, config.num_train_steps = 256, 16, 0.0, 70
    config.learning_rate, config.warmup_steps, config.eval_every_steps = 3e-4, 5, 70
    config.progress_bar, config.async_checkpoints = False, False
    result = dpo.train_and_evaluate(config, str(tmp_path / "dpo"))
    history = result.history
    final = [h for h in history if "eval_reward_accuracy" in h][-1]
    summary = json.loads((tmp_path / "dpo" / "dpo_eval.json").read_text())
    assert summary["eval_pairs"] == 231
    assert final["eval_reward_accuracy"] > 0.55, final
    assert final["eval_loss"] < math.log(2)
