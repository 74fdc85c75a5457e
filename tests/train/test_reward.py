"""Reward model: the margin ranking loss by hand and vs TRL's, scores read at the last real token (padding and batch
invariance), the per-rating table, data mixes and truncation, the Grain pair pipeline, and train.reward end to end.

Covers llama2_jax.model.score, llama2_jax.inference.reward_scores and llama2_jax.data.rm."""

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.checkpoints.params_io import load_params, save_params
from llama2_jax.data import rm as rm_data
from llama2_jax.data.preferences import RATINGS, PreferencePair
from llama2_jax.inference import reward_scores as rm_model
from llama2_jax.model import score as score_model
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.text.tokenizer import train_tokenizer
from llama2_jax.training import losses
from llama2_jax.training.checks import ConfigError

CFG = LlamaConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                  dtype="float32")


class TableModel:
    """A stand-in model: the score of a sequence is params["r"][its first token]."""
    def apply(self, variables, tokens, lengths):
        return variables["params"]["r"][tokens[:, 0]]


def pair_batch(score_index_pairs, ratings, valid=None, length=4):
    """tokens [P, 2, length] whose first tokens index TableModel's score table."""
    tokens = np.zeros((len(ratings), 2, length), np.int32)
    tokens[:, :, 0] = np.asarray(score_index_pairs)
    batch = {"tokens": tokens, "lengths": np.full((len(ratings), 2), length, np.int32),
             "rating": np.asarray(ratings, np.int32)}
    if valid is not None:
        batch["valid"] = np.asarray(valid, np.float32)
    return batch


def hand_loss(r_c, r_r, m):
    return -math.log(1.0 / (1.0 + math.exp(-(r_c - r_r - m))))


# ----------------------------------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("table,margins", [
    ("none", (0.0, 0.0, 0.0, 0.0)),
    ("small", (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0)),
    ("large", (3.0, 2.0, 1.0, 0.0)),
])
def test_loss_equals_hand_computed_values(table, margins):
    params = {"r": jnp.asarray([0.5, -0.25])}  # every pair: r_c = 0.5, r_r = -0.25
    ratings = [0, 1, 2, 3, -1]
    loss_sum, aux = losses.pairwise_loss(params, pair_batch([[0, 1]] * 5, ratings), model=TableModel(),
                                           margin_table=table)
    expected = [hand_loss(0.5, -0.25, m) for m in margins] + [hand_loss(0.5, -0.25, 0.0)]  # -1: no rating, m = 0
    assert float(loss_sum) == pytest.approx(sum(expected), rel=1e-6)
    assert float(aux["weight"]) == 5 and float(aux["accuracy"]) == 5
    assert float(aux["margin"]) == pytest.approx(5 * 0.75)
    if table == "small":  # one value written out: rating "better", -log sigma(0.75 - 2/3)
        one, _ = losses.pairwise_loss(params, pair_batch([[0, 1]], [1]), model=TableModel(), margin_table=table)
        assert float(one) == pytest.approx(math.log(1.0 + math.exp(-(0.75 - 2.0 / 3.0))), rel=1e-6)


def test_no_margin_equals_trl_pairwise_loss():
    torch = pytest.importorskip("torch", reason="torch is not installed: TRL's loss is computed with it")
    rng = np.random.default_rng(0)
    scores = rng.normal(size=16).astype(np.float32)
    r_c, r_r = torch.from_numpy(scores[:8]), torch.from_numpy(scores[8:])
    trl = float(-torch.nn.functional.logsigmoid(r_c - r_r).mean())  # trl RewardTrainer.compute_loss, no margin
    batch = pair_batch([[i, 8 + i] for i in range(8)], [0, 1, 2, 3, -1, 0, 1, 2])
    loss_sum, aux = losses.pairwise_loss({"r": jnp.asarray(scores)}, batch, model=TableModel(), margin_table="none")
    assert float(loss_sum / aux["weight"]) == pytest.approx(trl, rel=1e-6)


def test_per_rating_table_on_a_hand_made_batch():
    # scores: 0 -> 1.0, 1 -> 0.0, so [0, 1] is ranked right and [1, 0] wrong; [1, 1] is a tie (wrong).
    params = {"r": jnp.asarray([1.0, 0.0])}
    pairs = [[0, 1], [1, 0], [0, 1], [0, 1], [1, 1], [0, 1], [1, 0], [0, 1]]
    ratings = [0, 0, 1, 2, 3, -1, -1, 2]
    valid = [1, 1, 1, 1, 1, 1, 1, 0]  # the last pair is padding
    _, aux = losses.pairwise_loss(params, pair_batch(pairs, ratings, valid), model=TableModel())
    aux = {k: float(v) for k, v in aux.items()}
    assert aux["weight"] == 7 and aux["accuracy"] == 4
    counts = {level: (aux[f"n_{level}"], aux[f"correct_{level}"]) for level in losses.RATING_LEVELS}
    assert counts == {"significantly_better": (2, 1), "better": (1, 1), "slightly_better": (1, 1),
                      "negligibly_better": (1, 0), "unrated": (2, 1)}
    expected = {"accuracy_significantly_better": 0.5, "accuracy_better": 1.0, "accuracy_slightly_better": 1.0,
                "accuracy_negligibly_better": 0.0, "accuracy_unrated": 0.5}
    assert losses.per_rating_accuracy(aux) == expected
    # What the loop logs: every sum divided by the weight, prefixed "eval_". The ratios are unchanged.
    logged = {f"eval_{k}": v / aux["weight"] for k, v in aux.items() if k != "weight"}
    assert losses.per_rating_accuracy(logged, "eval_") == pytest.approx({f"eval_{k}": v for k, v in expected.items()})


def test_gradient_accumulation_keeps_pairs_together():
    """Micro-batches split the pair axis: accumulating over 4 micro-batches equals one step on the whole batch."""
    from llama2_jax.training import state as train_state

    params = {"r": jnp.linspace(-1.0, 1.0, 16)}
    rng = np.random.default_rng(0)
    batch = pair_batch(rng.integers(0, 16, size=(8, 2)), rng.integers(-1, 4, size=8), [1] * 7 + [0])
    loss_fn = functools.partial(losses.pairwise_loss, model=TableModel(), margin_table="small")
    results = []
    for accum in (1, 4):
        state = train_state.TrainState.create(params, train_state.make_optimizer(0.1))
        step = jax.jit(functools.partial(train_state.train_step, loss_fn=loss_fn, grad_accum_steps=accum))
        new_state, metrics = step(state, batch)
        results.append((np.asarray(new_state.params["r"]), {k: float(v) for k, v in metrics.items()}))
    for new_params, metrics in results[1:]:
        np.testing.assert_allclose(new_params, results[0][0], rtol=1e-6, atol=1e-7)
        assert metrics == pytest.approx(results[0][1], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The model


def llama_params(cfg, seed=0):
    init = jax.jit(lambda rng: nn.unbox(Llama(cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]))
    return init(jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def reward_params():
    return score_model.init_score_params_from_llama(llama_params(CFG), jax.random.PRNGKey(1), head_init_std=0.5)


score_jit = jax.jit(score_model.score_tokens, static_argnums=1)


def test_params_are_the_llama_trunk_plus_a_head(reward_params):
    abstract = score_model.abstract_score_params(CFG)
    assert jax.tree.map(np.shape, reward_params) == jax.tree.map(lambda x: x.shape, abstract)
    assert "output" not in reward_params and reward_params["score_head"]["kernel"].shape == (CFG.dim, 1)


def test_score_is_read_at_the_last_real_token_and_ignores_padding(reward_params):
    rng = np.random.default_rng(0)
    seq = rng.integers(3, CFG.vocab_size, size=7)
    alone = score_jit(reward_params, CFG, jnp.asarray(seq[None]), jnp.asarray([7]))
    for width, pad in ((8, 0), (16, 5), (32, CFG.vocab_size - 1)):
        tokens = np.full((1, width), pad, np.int32)
        tokens[0, :7] = seq
        padded = score_jit(reward_params, CFG, jnp.asarray(tokens), jnp.asarray([7]))
        np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-6)
    # The score is the head applied to the final hidden state of token 6.
    hidden = jax.jit(lambda p, x: Llama(CFG).apply({"params": p}, x, return_hidden=True))(
        {**reward_params, "output": jnp.zeros((CFG.dim, CFG.vocab_size))}, jnp.asarray(seq[None]))
    np.testing.assert_allclose(alone, hidden[:, 6] @ reward_params["score_head"]["kernel"][:, 0], rtol=1e-5)
    prefix = score_jit(reward_params, CFG, jnp.asarray(seq[None]), jnp.asarray([5]))
    assert abs(float(prefix[0] - alone[0])) > 1e-4  # a shorter length reads another token


def random_pair_batch(rng, n_pairs, width=12):
    lengths = rng.integers(2, width + 1, size=(n_pairs, 2)).astype(np.int32)
    tokens = rng.integers(3, CFG.vocab_size, size=(n_pairs, 2, width)).astype(np.int32)
    tokens[np.arange(width)[None, None, :] >= lengths[..., None]] = 0
    return {"tokens": tokens, "lengths": lengths, "rating": rng.integers(-1, 4, size=n_pairs).astype(np.int32)}


def test_pair_order_and_batch_order_do_not_change_the_result(reward_params):
    batch = random_pair_batch(np.random.default_rng(1), 6)
    model = score_model.ScoreModel(CFG)
    loss_fn = jax.jit(functools.partial(losses.pairwise_loss, model=model, margin_table="small"))
    loss, aux = loss_fn(reward_params, batch)
    perm = np.random.default_rng(2).permutation(6)
    loss_p, aux_p = loss_fn(reward_params, {k: v[perm] for k, v in batch.items()})
    assert float(loss_p) == pytest.approx(float(loss), rel=1e-5)
    for name in aux:
        assert float(aux_p[name]) == pytest.approx(float(aux[name]), rel=1e-5, abs=1e-5), name
    # Each pair's scores equal the scores of its two sequences on their own (no interaction between rows).
    r_c, r_r = jax.jit(lambda p, b: losses.pair_scores(p, b, model))(reward_params, batch)
    for p in range(6):
        for side, r in ((0, r_c), (1, r_r)):
            own = score_jit(reward_params, CFG, jnp.asarray(batch["tokens"][p, side, None]),
                            jnp.asarray(batch["lengths"][p, side, None]))
            assert float(r[p]) == pytest.approx(float(own[0]), rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Data


def make_pairs(n_helpful, n_safety):
    pairs = [PreferencePair([{"role": "user", "content": f"help {i}"}], "a", "b") for i in range(n_helpful)]
    return pairs + [PreferencePair([{"role": "user", "content": f"safe {i}"}], "a", "b", is_safety=True)
                    for i in range(n_safety)]


def test_helpful_mix_takes_all_helpful_and_as_many_others():
    pairs = make_pairs(100, 300)
    mixed = rm_data.helpful_mix(pairs, seed=0)
    assert sum(not p.is_safety for p in mixed) == 100 and sum(p.is_safety for p in mixed) == 100
    assert len({p.prompt[0]["content"] for p in mixed}) == 200  # sampled without replacement
    assert mixed == rm_data.helpful_mix(pairs, seed=0) and mixed != rm_data.helpful_mix(pairs, seed=1)


def test_helpful_mix_draws_its_equal_part_from_collected_safety_and_open_source_without_chosen_unsafe(caplog):
    def group(name, n, is_safety, origin, unsafe_chosen=0):
        return [PreferencePair([{"role": "user", "content": f"{name} {i}"}], "a", "b", is_safety=is_safety,
                               chosen_safe=False if i < unsafe_chosen else None,
                               rejected_safe=True if i < unsafe_chosen else None, origin=origin) for i in range(n)]

    pairs = (group("help", 40, False, "collected") + group("safe", 30, True, "collected", unsafe_chosen=5)
             + group("open_help", 30, False, "open_source") + group("open_safe", 20, True, "open_source"))
    drawn = {"safe": [], "open_help": [], "open_safe": []}
    for seed in range(200):
        mixed = rm_data.helpful_mix(pairs, seed=seed)
        names = [p.prompt[0]["content"].rsplit(" ", 1)[0] for p in mixed]
        assert names[:40] == ["help"] * 40 and len(mixed) == 80 and len(set(map(id, mixed))) == 80
        assert not any(p.chosen_unsafe_other_safe for p in mixed)  # 5 collected safety pairs are never drawn
        for name in drawn:
            drawn[name].append(names.count(name))
    # 40 drawn uniformly from the 75 eligible others: 25 safe + 30 open_help + 20 open_safe
    for name, eligible in (("safe", 25), ("open_help", 30), ("open_safe", 20)):
        assert np.mean(drawn[name]) == pytest.approx(40 * eligible / 75, abs=0.6), name

    # no origin anywhere (the shipped files): every helpfulness pair is the core, the equal part comes from safety
    caplog.set_level("INFO")
    untagged = make_pairs(10, 30)
    mixed = rm_data.helpful_mix(untagged, seed=0)
    assert sum(not p.is_safety for p in mixed) == 10 and sum(p.is_safety for p in mixed) == 10
    assert "10 of 10 helpfulness pairs state no origin" in caplog.text


def test_safety_mix_is_90_10(caplog):
    mixed = rm_data.safety_mix(make_pairs(100, 270), seed=0)
    assert sum(p.is_safety for p in mixed) == 270 and sum(not p.is_safety for p in mixed) == 30
    few = rm_data.safety_mix(make_pairs(10, 270), seed=0)  # wants 30 helpful, has 10: takes all, says so
    assert sum(not p.is_safety for p in few) == 10 and "only 10 exist" in caplog.text
    assert rm_data.apply_mix("none", make_pairs(2, 3), 0) == make_pairs(2, 3)


def test_truncation_rules():
    prompt = [1] + list(range(10, 20))  # BOS + 10 tokens
    same, cut_p, cut_r = rm_data.truncate_pair(prompt, [[5, 2], [6, 6, 2]], max_len=14)
    assert same == [prompt + [5, 2], prompt + [6, 6, 2]] and not cut_p and not cut_r
    (c, r), cut_p, cut_r = rm_data.truncate_pair(prompt, [[5, 2], [6, 6, 6, 6, 2]], max_len=12, bos_id=1)
    assert c == [1, 14, 15, 16, 17, 18, 19, 5, 2] and r == [1, 14, 15, 16, 17, 18, 19, 6, 6, 6, 6, 2]
    assert cut_p and not cut_r  # the prompt loses its oldest tokens, keeps BOS; both keep the same prompt
    (c, r), cut_p, cut_r = rm_data.truncate_pair(prompt, [[5, 2], list(range(30, 50))], max_len=12, bos_id=1)
    assert r[:6] == [1, 15, 16, 17, 18, 19] and r[6:] == list(range(30, 36)) and c == [1, 15, 16, 17, 18, 19, 5, 2]
    assert cut_p and cut_r  # a very long answer loses its end; the prompt keeps max_len // 2 tokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = "the a cat dog safe help answer question please thanks why how what no yes sorry can you I".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=12)) + f" {i}." for i in range(400)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("spm") / "rm", CFG.vocab_size)


def test_encode_pairs_counts_truncations(tokenizer, caplog):
    pairs = [PreferencePair([{"role": "user", "content": "how can you help " * k}], "yes " * k, "no")
             for k in (1, 8, 40)]
    encoded, stats = rm_data.encode_pairs(tokenizer, pairs, max_len=48)
    assert (stats.pairs, stats.prompt_truncated, stats.response_truncated) == (3, 2, 1)
    assert "prompt (left) in 2, response (right) in 1" in caplog.text
    assert all(len(e.chosen) <= 48 and len(e.rejected) <= 48 for e in encoded)
    full, _ = rm_data.encode_pairs(tokenizer, pairs[:1], max_len=1000)
    assert full[0].chosen[-1] == tokenizer.eos_id and full[0].rating == -1  # scored at the answer's EOS


def test_train_iterator_state_and_eval_padding():
    enc = [rm_data.EncodedPair(np.arange(1, 3 + i % 5, dtype=np.int32), np.arange(1, 4, dtype=np.int32), i % 4 - 1)
           for i in range(21)]
    it = rm_data.make_train_iterator(enc, 4, 8, seed=3)
    first = next(it)
    assert first["tokens"].shape == (4, 2, 8) and first["lengths"].shape == (4, 2) and first["rating"].shape == (4,)
    state = it.get_state()
    expected = [next(it) for _ in range(7)]  # crosses the epoch boundary (21 pairs = 5.25 batches)
    it.set_state(state)
    for batch in expected:
        got = next(it)
        assert all(np.array_equal(got[k], batch[k]) for k in batch)
    other = next(rm_data.make_train_iterator(enc, 4, 8, seed=4))
    assert not np.array_equal(other["tokens"], first["tokens"])
    evals = rm_data.make_eval_batches(enc, 8, 8)
    assert len(evals) == 3 and evals[-1]["valid"].tolist() == [1] * 5 + [0] * 3
    assert sum(b["valid"].sum() for b in evals) == 21


# ----------------------------------------------------------------------------------------------------------------------
# The trainer, end to end


def write_pairs(path, n):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):  # a learnable rule: the chosen answer is polite
            f.write(json.dumps({"prompt": f"question {i} why the cat", "chosen": "yes please thanks",
                                "rejected": "no " + "dog " * int(rng.integers(1, 4)),
                                "rating": RATINGS[i % 4] if i % 5 else None}) + "\n")
    return path


@pytest.mark.slow
def test_train_and_evaluate_end_to_end(tmp_path, tokenizer):
    from configs import rm_tiny
    from train import reward

    init_dir = tmp_path / "llama"
    save_params(init_dir, llama_params(CFG), CFG)
    (init_dir / "tokenizer.model").write_bytes(open(tokenizer.model_path, "rb").read())
    config = rm_tiny.get_config()
    config.init_from = str(init_dir)
    config.data.path = str(write_pairs(tmp_path / "pairs.jsonl", 80))
    config.mesh.data, config.mesh.fsdp = 1, -1  # FSDP over the 8 simulated devices
    config.batch_size, config.seq_len, config.model.max_seq_len = 8, 32, 32
    config.num_epochs, config.num_train_steps, config.eval_every_steps = 0.0, 6, 3
    config.learning_rate, config.async_checkpoints, config.progress_bar = 3e-3, False, False
    result = reward.train_and_evaluate(config, str(tmp_path / "rm"))
    state, history = result.state, result.history

    evals = [h for h in history if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [3, 6] and int(state.step) == 6
    summary = json.loads((tmp_path / "rm" / "rm_eval.json").read_text())
    assert summary["eval_pairs"] == 8 and summary["train_pairs"] == 72
    assert sum(row["pairs"] for row in summary["per_rating"].values()) == 8
    assert summary["accuracy"] == evals[-1]["eval_accuracy"] and np.isfinite(summary["loss"])

    params, cfg = load_params(tmp_path / "rm", kind="score")  # the RM workdir serves rejection sampling / PPO
    dialogs = [rm_model.dialog_for_scoring([{"role": "user", "content": "why the cat"}], answer)
               for answer in ("yes please thanks", "no dog dog")]
    scores = rm_model.score(params, cfg, dialogs, tokenizer, batch_size=2)
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))
    tokens = [rm_data.split_prompt_response(tokenizer, d)[0] + rm_data.split_prompt_response(tokenizer, d)[1]
              for d in dialogs]
    np.testing.assert_allclose(rm_model.score(params, cfg, tokens, batch_size=4), scores, rtol=1e-5)


def test_configs_load_and_bad_fields_name_the_field(tmp_path):
    from configs import rm_helpful_7b, rm_safety_7b, rm_tiny
    from train import reward

    for module in (rm_helpful_7b, rm_safety_7b, rm_tiny):
        config = module.get_config()
        config.data.path = "pairs.jsonl"
        reward.check_fields(config)
    assert rm_safety_7b.get_config().data.mix == "safety" and rm_helpful_7b.get_config().batch_size == 512
    config = rm_tiny.get_config()
    config.data.path = "pairs.jsonl"
    config.margin_table = "huge"
    with pytest.raises(ConfigError, match=r"^config.margin_table='huge'"):
        reward.check_fields(config)
    config = rm_helpful_7b.get_config()
    with pytest.raises(ConfigError, match=r"^config.data.path"):
        reward.check_fields(config)
    assert reward.schedule_steps(rm_helpful_7b.get_config(), 100_000) == (195, 6)  # 3 % of 195 = 6 > 5
    assert reward.schedule_steps(rm_helpful_7b.get_config(), 10_000) == (19, 5)  # minimum 5
