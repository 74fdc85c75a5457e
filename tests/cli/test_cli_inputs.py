"""Bad input to the command lines is one line: generate/chat flags and prompts, GAtt's fields, the generation
library's prompt checks behind them, the CPU default dtype, convert's truncated safetensors and destinations,
and evaluate's output paths checked before any work.

Covers llama2_jax.cli.common, llama2_jax.cli.generate, llama2_jax.cli.chat and llama2_jax.paths."""

import json

import jax
import pytest
from helpers.small_inputs import BIG_VOCAB, VOCAB, small_tokenizer, tiny_model

from llama2_jax.checkpoints import convert
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.cli import chat as chat_cli
from llama2_jax.cli import common as cli_common
from llama2_jax.cli import convert as convert_cli
from llama2_jax.cli import generate as generate_cli
from llama2_jax.inference import generate as gen
from llama2_jax.model.config import LlamaConfig
from llama2_jax.text.tokenizer import Tokenizer
from llama2_jax.training.checks import ConfigError
from train import gatt


def cli_error(main, argv, capsys) -> str:
    """The CLI's stderr, asserted to be exactly one `error: ...` line with exit status 1."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(dir, tokenizer path): dir/ok has the tokenizer's vocabulary, dir/big (only its llama_config.json) a larger
    one, dir/notsp.model is not a SentencePiece file, dir/file is a regular file."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = small_tokenizer(root)
    checkpoint.save_params(root / "ok", *tiny_model(VOCAB))
    (root / "big").mkdir()  # the vocabulary is checked before any weight is read
    (root / "big" / "llama_config.json").write_text((root / "ok" / "llama_config.json").read_text().replace(
        f'"vocab_size": {VOCAB}', f'"vocab_size": {BIG_VOCAB}'))
    (root / "notsp.model").write_text("not a model")
    (root / "file").write_text("x")
    return root, tokenizer.model_path


def test_generate_and_chat_command_lines_one_line_errors(models, capsys):
    root, tok = models
    ok = [f"--checkpoint={root / 'ok'}", f"--tokenizer={tok}", "--max_gen_len=2"]
    probes = {  # argv -> the error it must print
        (f"--checkpoint={root / 'nope'}", f"--tokenizer={tok}"): "nope/llama_config.json not found",
        (f"--checkpoint={root / 'file'}", f"--tokenizer={tok}"): "is not a jax-format checkpoint",
        (f"--checkpoint={root}", f"--tokenizer={tok}"): "is not a jax-format checkpoint",
        (f"--checkpoint={root / 'ok'}", f"--tokenizer={root / 'notsp.model'}"): "not a SentencePiece model file",
        (f"--checkpoint={root / 'ok'}", f"--tokenizer={root / 'missing.model'}"): "tokenizer model file not found",
        (f"--checkpoint={root / 'big'}", f"--tokenizer={tok}"): f"has {VOCAB} pieces but the model's vocab_size is "
                                                                f"{BIG_VOCAB}; they must be equal",
        ("--max_gen_len=-1", *ok[:2]): "--max_gen_len must be an integer >= 0",
    }
    for argv, message in probes.items():
        assert message in cli_error(generate_cli.main, list(argv) + ["--prompt=hi"], capsys)
        assert message in cli_error(chat_cli.main, list(argv), capsys)
    too_long = cli_error(generate_cli.main, ok + ["--prompt=hi", "--prompt=" + "word " * 40], capsys)
    assert too_long.startswith("error: --prompt: prompt 1 has ") and too_long.endswith(
        "tokens; a prompt needs 1 to max_seq_len (32) tokens")
    assert "--prompt is not valid UTF-8 text" in cli_error(generate_cli.main, ok + ["--prompt=caf\udce9"], capsys)
    assert "--system is not valid UTF-8 text" in cli_error(chat_cli.main, ok + ["--system=\udcff"], capsys)


def test_chat_answers_a_non_utf8_line_with_an_error_and_goes_on(models, monkeypatch):
    import io

    root, tok = models
    params, cfg = tiny_model(VOCAB)
    monkeypatch.setattr(chat_cli, "stream_reply", lambda *a, **k: iter(["fine"]))  # the loop is tested, not decoding
    lines, out = iter(["caf\udce9", "hello", "/exit"]), io.StringIO()
    dialog = chat_cli.run_repl(params, cfg, Tokenizer(tok), max_gen_len=2, temperature=0.0, read=lambda _: next(lines),
                               out=out)
    assert "error: the message is not valid UTF-8 text" in out.getvalue()
    assert dialog == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]


def gatt_error(config, workdir) -> str:
    """train.gatt's one-line ConfigError for `config`; nothing is written in `workdir`."""
    with pytest.raises(ConfigError) as error:
        gatt.train_and_evaluate(config, str(workdir))
    assert "\n" not in str(error.value) and not workdir.exists()
    return str(error.value)


def test_gatt_checks_its_fields_and_inputs_before_sampling(models, tmp_path, monkeypatch):
    from configs import gatt_tiny

    root, tok = models
    dialogs = tmp_path / "d.jsonl"
    dialogs.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}]}) + "\n")
    (tmp_path / "bad.jsonl").write_bytes(dialogs.read_bytes() + b"\xff\xfe\n")
    monkeypatch.setattr(gatt, "make_gatt_records", lambda *a, **k: pytest.fail("sampled despite a bad input"))

    def config(init_from=root / "ok", tokenizer=tok, data=dialogs, **fields):
        config = gatt_tiny.get_config()
        config.init_from, config.tokenizer.path, config.data.path = str(init_from), str(tokenizer), str(data)
        for dotted, value in fields.items():
            section, name = dotted.split("__")
            config[section][name] = value
        return config

    work = tmp_path / "work"
    assert gatt_error(config(data=tmp_path / "bad.jsonl"), work) == (
        f"config.data: {tmp_path / 'bad.jsonl'}:2: not UTF-8 text (invalid start byte at byte 0)")
    checkpoint.save_params(tmp_path / "big", *tiny_model(BIG_VOCAB))  # complete: its params pass their check
    assert f"has {VOCAB} pieces but the model's vocab_size is {BIG_VOCAB}" in gatt_error(
        config(init_from=tmp_path / "big"), work)
    assert "not a SentencePiece" in gatt_error(config(tokenizer=root / "notsp.model"), work)
    for value in (9, 0, -1):  # the former --max_constraints: 1-3 instructions per dialog
        assert gatt_error(config(gatt__max_constraints=value), work) == (
            f"config.gatt.max_constraints must be 1, 2 or 3 (instructions combined per dialog), got {value}")
    assert gatt_error(config(sampling__batch_size=0), work).startswith(  # the former --batch_size=0
        "config.sampling.batch_size (0) and config.sampling.max_gen_len (32) must be >= 1")
    assert gatt_error(config(gatt__samples="every"), work).startswith("config.gatt.samples is 'every'")
    assert gatt_error(config(sft__batch_size=3), work) == (  # the fine-tuning's batch, before any sampling
        "config.sft.batch_size / grad_accum_steps = 3 is not divisible by the data-parallel size 8 (mesh data x fsdp)")


def test_model_clis_default_to_float32_on_cpu(models):
    from configs import gatt_tiny

    root, tok = models
    flags = [f"--checkpoint={root / 'ok'}", f"--tokenizer={tok}"]
    assert jax.default_backend() == "cpu" and cli_common.default_dtype() == "float32"
    assert generate_cli.parse_args(flags + ["--prompt=hi"]).dtype == "float32"
    assert chat_cli.parse_args(flags).dtype == "float32"
    assert gatt_tiny.get_config().model.dtype == "float32"


# ---------------------------------------------------------------------------------------------- generation library


def test_library_rejects_out_of_vocabulary_ids_and_long_prompts_by_index():
    params, cfg = tiny_model(VOCAB)
    for bad, shown in ((VOCAB, str(VOCAB)), (-1, "-1")):
        with pytest.raises(ValueError, match=rf"^prompt 1 holds token id {shown}, outside the model's vocabulary "
                                             rf"\[0, {VOCAB}\)$"):
            gen.generate(params, cfg, [[1, 5], [1, bad, 7]], max_gen_len=2)
        with pytest.raises(ValueError, match=r"^prompt 1 holds token id"):
            gen.sample_lists(params, cfg, [[1, 5], [1, bad]], max_gen_len=2)
    with pytest.raises(ValueError, match=r"^prompt 2 has 40 tokens; a prompt needs 1 to max_seq_len \(32\)"):
        gen.generate(params, cfg, [[1], [1, 2], [1] * 40], max_gen_len=2)
    with pytest.raises(ValueError, match=r"^prompt 0 has 0 tokens"):
        gen.generate(params, cfg, [[]], max_gen_len=2)


def test_text_completion_rejects_a_tokenizer_larger_than_the_model(models):
    small_params, small_cfg = tiny_model(64)
    tokenizer = Tokenizer(models[1])
    prompt = "the quick brown fox jumps over the lazy dog"
    assert max(tokenizer.encode(prompt)) >= 64  # ids the 64-row embedding does not have
    with pytest.raises(ValueError, match=r"^prompt 0 holds token id \d+, outside the model's vocabulary \[0, 64\)"):
        gen.text_completion(small_params, small_cfg, tokenizer, [prompt], max_gen_len=2)


# ---------------------------------------------------------------------------------------------- convert


def test_convert_truncated_safetensors_and_bad_dst(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, multiple_of=16, max_seq_len=32)
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(convert.config_to_hf(cfg, "float32")))
    save_file({"model.embed_tokens.weight": torch.zeros(64, 32)}, str(src / "model.safetensors"))
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert convert_cli.main(["--from=hf", "--to=jax", f"--src={src}", f"--dst={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {src / 'model.safetensors'}: not a readable safetensors "
                                                   "file"), err
    (tmp_path / "afile").write_text("x")
    assert convert_cli.main(["--from=hf", "--to=jax", f"--src={src}", f"--dst={tmp_path / 'afile'}"]) == 1
    assert capsys.readouterr().err == f"error: --dst {tmp_path / 'afile'} is a file, not a directory\n"

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("llama2_jax.paths.tempfile.TemporaryFile", read_only)
    monkeypatch.setattr(convert, "load_hf", lambda *a: pytest.fail("read the source before checking --dst"))
    assert convert_cli.main(["--from=hf", "--to=jax", f"--src={src}", f"--dst={tmp_path / 'ro'}"]) == 1
    assert capsys.readouterr().err == (f"error: --dst {tmp_path / 'ro'}: cannot write in {tmp_path / 'ro'} "
                                       "(Permission denied)\n")


def test_evaluate_checks_its_output_paths_before_any_work(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval._cli import HarnessCLI

    from llama2_jax.cli import evaluate
    from llama2_jax.evaluation import reward_model as rm_eval

    for name in ("ckpt", "rm"):
        (tmp_path / name).mkdir()
    for name in ("tok.model", "pairs.jsonl", "afile"):
        (tmp_path / name).write_text("x")
    monkeypatch.setattr(HarnessCLI, "execute", lambda *a: pytest.fail("ran lm-eval despite a bad --output_path"))
    monkeypatch.setattr(rm_eval, "run", lambda *a: pytest.fail("scored pairs despite a bad --histogram"))
    model = [f"--checkpoint={tmp_path / 'ckpt'}", f"--tokenizer={tmp_path / 'tok.model'}", "--tasks=piqa_local"]
    for output_path in (tmp_path / "afile", tmp_path / "afile" / "results.json"):
        assert evaluate.main(model + [f"--output_path={output_path}"]) == 1
        assert capsys.readouterr().err == (f"error: --output_path {output_path}: {tmp_path / 'afile'} is a file, not "
                                           "a directory\n")
    rm = [f"--reward_model={tmp_path / 'rm'}", f"--pairs={tmp_path / 'pairs.jsonl'}",
          f"--tokenizer={tmp_path / 'tok.model'}"]
    assert evaluate.main(rm + [f"--histogram={tmp_path}"]) == 1
    assert capsys.readouterr().err == f"error: --histogram {tmp_path} is a directory; pass a file path\n"
