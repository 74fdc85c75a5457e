"""The `llama2_jax` lm-eval backend: scores against an unpadded HF forward pass (torch) summed by hand, tokenization
as lm-eval's hf backend does it for Llama, Meta's chat format, sharding, bad input, and `evaluate_tasks`.

Covers llama2_jax.evaluation.harness, llama2_jax.evaluation.tasks.local_data, llama2_jax.inference.scoring and
llama2_jax.cli.evaluate."""

import json

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="the lm-eval backend needs lm-eval (pip install -e .[eval])")

from helpers import hf_reference  # noqa: E402  (tests/helpers/hf_reference.py: skips without torch / transformers)
from lm_eval.api.instance import Instance  # noqa: E402

from llama2_jax.data.sources import default_corpus  # noqa: E402
from llama2_jax.evaluation.harness import evaluate_tasks  # noqa: E402
from llama2_jax.evaluation.lm_eval_backend import LlamaJaxLM  # noqa: E402
from llama2_jax.inference import scoring as lm_scoring
from llama2_jax.model import sharding as sh  # noqa: E402
from llama2_jax.model.config import LlamaConfig  # noqa: E402
from llama2_jax.text import chat_format as chat  # noqa: E402
from llama2_jax.text.tokenizer import train_tokenizer  # noqa: E402

CFG = LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=48,
                  dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(default_corpus(), tmp_path_factory.mktemp("spm") / "eval", CFG.vocab_size)


@pytest.fixture(scope="module")
def hf():
    """The reference: a random HF LlamaForCausalLM (torch, eager)."""
    return hf_reference.hf_model(CFG, seed=3)


@pytest.fixture(scope="module")
def params(hf):
    return hf_reference.params_from_hf(hf, CFG)


@pytest.fixture(scope="module")
def lm(params, tokenizer):
    return LlamaJaxLM.from_params(params, CFG, tokenizer, batch_size=4)


def _hand_score(hf, context, continuation, max_len):
    """Sum of log-probs of the continuation and its greedy flag, from one unpadded HF forward pass (float64 softmax)."""
    whole = (list(context) + list(continuation))[-(max_len + 1):]
    logits = hf_reference.hf_logits(hf, np.array([whole[:-1]]))[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    rows = np.arange(len(whole) - 1 - len(continuation), len(whole) - 1)
    targets = np.array(whole[1:])[rows]
    return float(log_probs[rows, targets].sum()), bool((logits[rows].argmax(-1) == targets).all())


def _requests(hf):
    rng = np.random.default_rng(0)
    requests = [(list(rng.integers(3, 512, n)), list(rng.integers(3, 512, m)))
                for n, m in [(1, 1), (5, 3), (20, 2), (7, 30), (40, 20), (3, 12), (11, 1)]]
    # a continuation that is the model's greedy path, so is_greedy must be True
    context = [1, 17, 99]
    logits = hf_reference.hf_logits(hf, np.array([context]))[0]
    requests.append((context, [int(logits[-1].argmax())]))
    return requests


def test_scores_equal_the_unpadded_hf_forward_pass(params, hf):
    requests = _requests(hf)
    got = lm_scoring.continuation_logprobs(params, CFG, requests, batch_size=3)
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        want_lp, want_greedy = _hand_score(hf, context, continuation, CFG.max_seq_len)
        assert abs(logprob - want_lp) <= 1e-4 * max(1.0, abs(want_lp)), (len(context), len(continuation))
        assert greedy == want_greedy
    assert got[-1][1]  # the greedy continuation
    assert any(len(c) + len(x) > CFG.max_seq_len + 1 for c, x in requests)  # left truncation was exercised


def test_scores_on_a_mesh_equal_the_single_device_scores(params, hf):
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    requests = _requests(hf)
    sharded = lm_scoring.shard_params(params, CFG, mesh)
    got = lm_scoring.continuation_logprobs(sharded, CFG, requests, batch_size=3, mesh=mesh)
    want = lm_scoring.continuation_logprobs(params, CFG, requests, batch_size=3)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_buckets():
    assert [lm_scoring.bucket_width(n, 4096) for n in (1, 16, 17, 24, 25, 33, 49, 65, 200)] == \
        [16, 16, 24, 24, 32, 48, 64, 96, 256]
    assert lm_scoring.bucket_width(300, 256) == 256
    assert [lm_scoring.scored_columns(n, 64) for n in (1, 16, 17, 32, 33, 64)] == [16, 16, 24, 32, 48, 64]
    assert lm_scoring.scored_columns(20, 16) == 16


def test_bad_requests_raise_one_line_errors(params):
    with pytest.raises(ValueError, match="at least one context token"):
        lm_scoring.continuation_logprobs(params, CFG, [([], [5])])
    with pytest.raises(ValueError, match=r"does not fit the 48-token window \(max_seq_len\): raise it with --max_length"):
        lm_scoring.continuation_logprobs(params, CFG, [([1], list(range(3, 60)))])


def test_max_length_scores_past_max_seq_len_as_hf_does(params, tokenizer, hf):
    """model_arg max_length widens the window past the checkpoint's max_seq_len (RoPE positions are computed), as
    the hf backend's max_length does; the 57-token continuation that does not fit 48 is scored like HF's forward."""
    lm = LlamaJaxLM.from_params(params, CFG, tokenizer, batch_size=4, max_length=96)
    assert lm.max_length == 96
    context, continuation = [1, 5, 9], list(range(3, 60))
    (logprob, greedy), = lm._loglikelihood_tokens([(None, context, continuation)])
    want_lp, want_greedy = _hand_score(hf, context, continuation, 96)
    assert abs(logprob - want_lp) <= 1e-4 * abs(want_lp) and greedy == want_greedy
    for bad in (0, "-3", "x"):
        with pytest.raises(ValueError, match=r"^max_length=.*: expected a positive number of tokens"):
            LlamaJaxLM.from_params(params, CFG, tokenizer, max_length=bad)


def test_tok_encode_follows_hf_llama_bos_rules(lm, tokenizer):
    ids = tokenizer.encode("Hello world")
    assert lm.tok_encode("Hello world") == [tokenizer.bos_id] + ids
    assert lm.tok_encode("Hello world", add_special_tokens=False) == ids
    assert lm.tok_encode("<s>Hello world") == [tokenizer.bos_id] + ids  # no second BOS
    assert lm.tok_encode("a</s><s>b", add_special_tokens=False) == \
        tokenizer.encode("a") + [tokenizer.eos_id, tokenizer.bos_id] + tokenizer.encode("b")


def test_loglikelihood_splits_context_and_continuation_as_lm_eval(lm, tokenizer, hf):
    """Trailing context spaces move to the continuation; continuation = encode(whole)[len(encode(context)):]."""
    requests = [Instance("loglikelihood", {}, ("Question: what is it?\nAnswer: ", "a test"), 0),
                Instance("loglikelihood", {}, ("", "no context"), 0)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    whole = [tokenizer.bos_id] + tokenizer.encode("Question: what is it?\nAnswer: a test")
    context = [tokenizer.bos_id] + tokenizer.encode("Question: what is it?\nAnswer:")
    assert got[0][0] == pytest.approx(_hand_score(hf, context, whole[len(context):], CFG.max_seq_len)[0],
                                      abs=1e-4)
    assert got[1][0] == pytest.approx(_hand_score(hf, [tokenizer.bos_id], tokenizer.encode("no context"),
                                                  CFG.max_seq_len)[0], abs=1e-4)


def test_rolling_loglikelihood_sums_disjoint_windows(lm, tokenizer, hf):
    text = default_corpus()[0][:600]
    tokens = [tokenizer.bos_id] + tokenizer.encode(text)  # lm-eval's hf backend rolls over BOS + text
    assert len(tokens) > 2 * CFG.max_seq_len
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    want, start = 0.0, 0
    while start < len(tokens):  # windows of max_seq_len predictions, each conditioned on what precedes it
        end = min(start + CFG.max_seq_len, len(tokens))
        context = [tokenizer.bos_id] if start == 0 else tokens[max(0, end - CFG.max_seq_len - 1):start]
        want += _hand_score(hf, context, tokens[start:end], CFG.max_seq_len)[0]
        start = end
    assert got == pytest.approx(want, rel=1e-5)


def test_chat_template_renders_meta_dialog_format(lm, tokenizer):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    rendered = lm.apply_chat_template(dialog)
    assert rendered.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST]")
    assert lm.tok_encode(rendered) == chat.encode_dialog(tokenizer, dialog)
    partial = lm.apply_chat_template(dialog + [{"role": "assistant", "content": "It is"}], add_generation_prompt=False)
    assert partial == rendered + " It is"
    assert lm.chat_template(True) and lm.chat_template(False) is None


def test_generate_until_equals_greedy_text_completion_cut_at_stops(lm, tokenizer, params):
    from llama2_jax.inference.generate import text_completion

    prompts = ["The quick brown", "Once upon a time there", "x"]
    full = [r["generation"] for r in text_completion(params, CFG, tokenizer, prompts, temperature=0.0,
                                                      max_gen_len=12)]
    stop = full[0][3:6]  # a stop sequence inside the first completion
    assert stop and stop in full[0]
    requests = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 12, "do_sample": False}), 0)
                for p in prompts]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got == [text.split(stop)[0] for text in full]
    assert got[0] == full[0][:full[0].index(stop)]


@pytest.mark.slow  # lm-eval indexes its whole task library (~20 s on 2 cores)
def test_evaluate_tasks_in_process(params, tokenizer, tmp_path):
    rows = [{"goal": f"goal {i}", "sol1": f"first answer {i}", "sol2": f"second {i}", "label": i % 2} for i in range(6)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "text.txt").write_text("One paragraph of text.\n\nAnother one, a little longer than that.\n")
    out = evaluate_tasks(params, CFG, tokenizer, ["piqa_local", "text_perplexity"], limit=None, num_fewshot=0,
                         batch_size=4, metadata={"piqa_path": str(tmp_path / "piqa.jsonl"),
                                                 "text_path": str(tmp_path / "text.txt")})
    assert set(out) == {"piqa_local", "text_perplexity"}
    assert 0.0 <= out["piqa_local"]["acc"] <= 1.0 and 0.0 <= out["piqa_local"]["acc_norm"] <= 1.0
    assert out["piqa_local"]["acc"] * 6 == pytest.approx(round(out["piqa_local"]["acc"] * 6))
    assert out["text_perplexity"]["word_perplexity"] > 1.0 and out["text_perplexity"]["bits_per_byte"] > 0.0


@pytest.mark.slow  # lm-eval's CLI indexes its whole task library (~20 s on 2 cores)
def test_cli_prints_lm_eval_table_and_writes_results_json(params, tokenizer, tmp_path, capsys):
    from llama2_jax.checkpoints.params_io import save_params
    from llama2_jax.cli.evaluate import main

    save_params(tmp_path / "ckpt", params, CFG)
    rows = [{"goal": f"goal {i}", "sol1": f"first answer {i}", "sol2": f"second {i}", "label": i % 2} for i in range(4)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([f"--checkpoint={tmp_path / 'ckpt'}", f"--tokenizer={tokenizer.model_path}", "--tasks=piqa_local",
                 "--metadata", f"piqa_path={tmp_path / 'piqa.jsonl'}", f"--output_path={tmp_path / 'out'}",
                 "--batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "piqa_local" in out and "acc_norm" in out and "llama2_jax" in out  # lm-eval's table
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["piqa_local"]["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert results["config"]["model"] == "llama2_jax"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from llama2_jax.cli.evaluate import main

    assert main([f"--checkpoint={tmp_path / 'nope'}", "--tokenizer=x.model", "--tasks=piqa_local"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --checkpoint={tmp_path / 'nope'} does not exist"


@pytest.mark.slow  # lm-eval's CLI indexes its whole task library
def test_cli_missing_task_data_is_one_line(params, tokenizer, tmp_path, capsys):
    from llama2_jax.checkpoints.params_io import save_params
    from llama2_jax.cli.evaluate import main

    save_params(tmp_path / "ckpt", params, CFG)
    args = [f"--checkpoint={tmp_path / 'ckpt'}", f"--tokenizer={tokenizer.model_path}", "--tasks=piqa_local"]
    assert main(args) == 1
    assert capsys.readouterr().err.strip().endswith("error: task piqa_local needs its data file: pass --metadata "
                                                    "piqa_path=FILE")


@pytest.mark.slow  # lm-eval's CLI indexes its whole task library
def test_cli_empty_task_data_is_one_line(params, tokenizer, tmp_path, capsys):
    from llama2_jax.checkpoints.params_io import save_params
    from llama2_jax.cli.evaluate import main

    save_params(tmp_path / "ckpt", params, CFG)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "empty.jsonl").write_text("")
    model = [f"--checkpoint={tmp_path / 'ckpt'}", f"--tokenizer={tokenizer.model_path}"]
    assert main(model + ["--tasks=text_perplexity", "--metadata", f"text_path={tmp_path / 'empty.txt'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'empty.txt'} holds no text to score (the file is empty or only blank lines)")
    assert main(model + ["--tasks=piqa_local", "--metadata", f"piqa_path={tmp_path / 'empty.jsonl'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'empty.jsonl'} holds no PIQA records (the file is empty)")
