"""Reward-model evaluation (`python -m llama2_jax.evaluate --reward_model=DIR --pairs=FILE`): accuracy per rating
level and margin from hand-computed values, and the CLI end to end on a tiny reward model made here.

Covers llama2_jax.evaluation.reward_model."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.cli import evaluate
from llama2_jax.data.sources import default_corpus
from llama2_jax.evaluation import reward_model as rm_eval
from llama2_jax.inference import reward_scores as reward_model
from llama2_jax.model import score as score_model
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.text.tokenizer import train_tokenizer

CFG = LlamaConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                  dtype="float32")
PAIRS = [  # (prompt, chosen, rejected, rating)
    ("What is two plus two?", "Four.", "Five, I think.", "significantly_better"),
    ("Name a colour.", "Blue.", "A fish.", "better"),
    ("Say hello.", "Hello there!", "Go away.", "better"),
    ("Is water wet?", "Yes, it is.", "Perhaps not.", "slightly_better"),
    ("Count to three.", "One, two, three.", "Three.", None),
    ("Pick a number.", "Seven.", "Twelve.", "negligibly_better"),
]


def test_pair_metrics_by_hand():
    chosen = np.array([0.9, 0.2, 0.7, 0.5, 0.4])
    rejected = np.array([0.1, 0.3, 0.6, 0.5, 0.1])
    ratings = ["better", "better", "significantly_better", "slightly_better", "unrated"]
    m = rm_eval.pair_metrics(chosen, rejected, ratings)
    assert m["n"] == 5 and m["accuracy"] == pytest.approx(3 / 5)  # the tie (0.5, 0.5) counts as wrong
    assert m["margin"] == pytest.approx((0.8 - 0.1 + 0.1 + 0.0 + 0.3) / 5)
    assert (m["accuracy_better"], m["n_better"]) == (0.5, 2)
    assert m["accuracy_significantly_better"] == 1.0 and m["accuracy_slightly_better"] == 0.0
    assert m["accuracy_unrated"] == 1.0 and "n_negligibly_better" not in m
    table = rm_eval.format_table(m)
    assert "significantly_better" in table and "all" in table and "60.0%" in table
    with pytest.raises(ValueError, match="unknown rating levels"):
        rm_eval.pair_metrics(chosen, rejected, ["much_better"] * 5)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A reward-model dir (params/ + llama_config.json + tokenizer.model) with a random head."""
    root = tmp_path_factory.mktemp("rm")
    tokenizer = train_tokenizer(default_corpus(), root / "tokenizer", CFG.vocab_size)
    llama = nn.unbox(Llama(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = score_model.init_score_params_from_llama(llama, jax.random.PRNGKey(1), head_init_std=0.5)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / "params", jax.device_get(params))
    (root / "llama_config.json").write_text(json.dumps(CFG.to_dict()))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r, "rating": g}) + "\n"
                             for p, c, r, g in PAIRS))
    return root, tokenizer, pairs


def test_cli_prints_accuracy_per_rating_and_writes_histogram(rm_dir, tmp_path, capsys):
    root, tokenizer, pairs = rm_dir
    png = tmp_path / "hist.png"
    assert evaluate.main([f"--reward_model={root}", f"--pairs={pairs}", f"--histogram={png}"]) == 0  # tokenizer
    out = capsys.readouterr().out  # from the RM dir
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same numbers from the reward model's own scoring of the dialogs, compared by hand
    params, cfg = checkpoint.load_params(root, kind="score")
    dialogs = [[{"role": "user", "content": p}, {"role": "assistant", "content": answer}]
               for p, c, r, _ in PAIRS for answer in (c, r)]
    scores = reward_model.score(params, cfg, dialogs, tokenizer)
    chosen, rejected = scores[0::2], scores[1::2]
    correct = chosen > rejected
    assert f"{'all':<22}{len(PAIRS):>7}{100 * correct.mean():>9.1f}%" in out
    better = [i for i, p in enumerate(PAIRS) if p[3] == "better"]
    assert f"{'better':<22}{2:>7}{100 * correct[better].mean():>9.1f}%" in out
    assert f"{'unrated':<22}{1:>7}" in out
    assert f"mean margin (chosen - rejected score): {(chosen - rejected).mean():.4f}" in out


def test_cli_bad_input_is_one_line(rm_dir, tmp_path, capsys):
    root, _, pairs = rm_dir
    assert evaluate.main([f"--reward_model={root}"]) == 1
    assert capsys.readouterr().err.strip() == "error: --reward_model needs --pairs=FILE"
    assert evaluate.main([f"--reward_model={root}", f"--pairs={tmp_path / 'missing.jsonl'}"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --pairs={tmp_path / 'missing.jsonl'} does not exist"
    assert evaluate.main(["--tasks=piqa_local"]) == 1
    assert capsys.readouterr().err.startswith("error: pass --checkpoint=DIR and --tokenizer=FILE")
