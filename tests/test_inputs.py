"""Bad input is one line: shared trainer fields, the generate/chat/convert command lines, GAtt's fields, the generation
library's prompt checks, output paths checked before any work, and the SFT data warnings and errors."""

import importlib
import json
import logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama2_jax.checkpoints import convert
from llama2_jax.checkpoints import params_io as checkpoint
from llama2_jax.checkpoints.layout import has_checkpoint
from llama2_jax.cli import chat as chat_cli
from llama2_jax.cli import common as cli_common
from llama2_jax.cli import convert as convert_cli
from llama2_jax.cli import generate as generate_cli
from llama2_jax.data import dialogs as dialog_readers
from llama2_jax.data import sft
from llama2_jax.inference import generate as gen
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama
from llama2_jax.text.tokenizer import Tokenizer, train_tokenizer
from llama2_jax.training import checks as config_checks
from llama2_jax.training import initial_state
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.model_config import resolve_model_config
from train import gatt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = [("pretrain", "tiny"), ("sft", "sft_tiny"), ("reward", "rm_tiny"), ("dpo", "dpo_tiny"),
            ("rejection_sampling", "rs_tiny"), ("ppo", "ppo_tiny"), ("context_distill", "cd_tiny"), ("gatt", "gatt_tiny")]
BAD_SHARED_FIELDS = [("num_train_steps", 0), ("num_train_steps", -5), ("learning_rate", -1e-4),
                     ("checkpoint_every_steps", 0), ("log_every_steps", 0), ("eval_every_steps", 0),
                     ("warmup_steps", -1), ("batch_size", 0), ("grad_accum_steps", 0), ("eval_batches", -1),
                     ("keep_checkpoints", 0), ("adam_b2", 1.0), ("data.val_fraction", 1.0), ("num_epochs", -1.0)]


def set_field(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value


# ---------------------------------------------------------------------------------------------- shared trainer fields


@pytest.mark.parametrize("trainer,config_name", TRAINERS)
def test_every_trainer_rejects_bad_shared_fields_before_any_work(tmp_path, trainer, config_name):
    module = importlib.import_module(f"train.{trainer}")
    config_module = importlib.import_module(f"configs.{config_name}")
    config_checks.check_shared_fields(config_module.get_config())  # the shipped config passes
    workdir = tmp_path / "work"
    for field, value in BAD_SHARED_FIELDS:
        config = config_module.get_config()
        set_field(config, field, value)
        if field == "num_train_steps":
            config.num_epochs = 0.0  # num_train_steps is the run's length
        with pytest.raises(ConfigError, match=rf"^config\.{field} must be ") as error:
            module.train_and_evaluate(config, str(workdir))
        assert "\n" not in str(error.value) and repr(value) in str(error.value)
    assert not workdir.exists()  # nothing written


def test_every_shipped_config_passes_the_shared_checks():
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        # base.py and recipe_common.py hold shared fields, not a runnable config
        if name.endswith(".py") and name not in ("__init__.py", "base.py", "recipe_common.py"):
            config_checks.check_shared_fields(importlib.import_module(f"configs.{name[:-3]}").get_config())


def test_num_train_steps_is_unchecked_when_epochs_set_the_length():
    from configs import sft_tiny

    config = sft_tiny.get_config()
    config.num_epochs, config.num_train_steps = 1.0, 0
    config_checks.check_shared_fields(config)


def test_cudnn_attention_on_cpu_names_the_field_and_backend():
    from configs import tiny

    config = tiny.get_config()
    config.model.attention_impl = "cudnn"
    with pytest.raises(ConfigError, match=r"^config.model.attention_impl='cudnn' needs an NVIDIA GPU, but the "
                                                 r"JAX backend is 'cpu'"):
        resolve_model_config(config)


def test_workdir_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match=r"^--workdir: .*file is a file, not a directory$"):
        config_checks.check_workdir_path(str(regular))
    config_checks.check_workdir_path(str(tmp_path / "new" / "work"))  # created
    assert (tmp_path / "new" / "work").is_dir()

    def read_only(*args, **kwargs):  # what a read-only directory gives a non-root user (root writes anyway)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    with pytest.raises(ConfigError, match=r"^--workdir: .* is not writable \(Permission denied\)$"):
        config_checks.check_workdir_path(str(tmp_path))


def test_trainer_command_line_one_line_errors(tmp_path):
    """One subprocess, two probes of the real absl entry point: a missing --config file, a --workdir that is a file."""
    regular = tmp_path / "file"
    regular.write_text("x")
    script = (
        "import sys\n"
        "from absl import app\n"
        "from train import pretrain\n"
        "from llama2_jax.cli import trainer as common\n"
        "from ml_collections import config_flags\n"
        "config_flags.DEFINE_config_file('config', None, 'config')\n"
        "common.define_runtime_flags()\n"
        "for argv in (['x', '--config=nope.py', '--workdir=%s'], ['x', '--config=configs/tiny.py', '--workdir=%s']):\n"
        "    common.FLAGS.unparse_flags()\n"
        "    common.FLAGS(argv)\n"
        "    try:\n"
        "        common.run_main(pretrain.train_and_evaluate)(['x'])\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n" % (tmp_path / "w", regular))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert result.stdout.split("\n")[:2] == ["exit 1", "exit 1"], result.stderr
    assert result.stderr.splitlines() == [
        "error: --config: [Errno 2] No such file or directory: 'nope.py'",
        f"error: --workdir: {regular} is a file, not a directory"]


def test_stray_directories_in_checkpoints_are_ignored_with_a_warning(tmp_path, caplog):
    from llama2_jax.training.checkpointer import TrainCheckpointer

    for name in ("backup", "notes.txt", "3.orbax-checkpoint-tmp-17"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="llama2_jax.training.checkpointer"):
        checkpointer = TrainCheckpointer(str(tmp_path), async_save=False)
    assert checkpointer.latest_step() is None and not has_checkpoint(str(tmp_path))
    checkpointer.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'checkpoints'}: ignoring 'backup', 'notes.txt' (not step directories)"]


def test_sft_tfds_spec_without_the_extra_names_it(tmp_path, monkeypatch):
    from configs import sft_tiny
    from train import sft as sft_trainer

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as when the extra is absent
    config = sft_tiny.get_config()
    config.data.path = "tfds:some_dataset"
    config.tokenizer.path = str(small_tokenizer(tmp_path).model_path)
    config.model.vocab_size = VOCAB
    with pytest.raises(ConfigError, match=r"^config.data: .*pip install -e \.\[tfds\]") as error:
        sft_trainer.train_and_evaluate(config, str(tmp_path / "work"))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ command lines


TEXTS = ["hello there, how are you today?", "I am fine, thank you very much.", "Once upon a time, in a land far "
         "away, there lived a king.", "[INST] <<SYS>> [/INST] The quick brown fox jumps over the lazy dog."] * 3
VOCAB = 300
BIG_VOCAB = 4096


def small_tokenizer(tmp_path) -> Tokenizer:
    if not (tmp_path / "tok.model").exists():
        train_tokenizer(TEXTS, tmp_path / "tok", vocab_size=VOCAB, num_threads=1)
    return Tokenizer(tmp_path / "tok.model")


def tiny_model(vocab_size: int, max_seq_len: int = 32):
    cfg = LlamaConfig(vocab_size=vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, multiple_of=16,
                      max_seq_len=max_seq_len, dtype="float32", scan_layers=False)
    shapes = nn.unbox(jax.eval_shape(Llama(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(0)  # random weights without compiling the init (these tests never run the model)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.02, s.shape).astype(np.float32), shapes["params"]), cfg


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


# ---------------------------------------------------------------------------------------------- SFT data


class CharTokenizer:
    """One id per character (ids 3..258), BOS 1, EOS 2."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [3 + (ord(c) % 256) for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


def sample(user: str, reply: str):
    return ([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], "all")


def test_sft_special_tags_in_turns_are_counted_and_warned_once(caplog):
    samples = [sample("hi [INST] there", "ok"), sample("plain", "fine <</SYS>>"), sample("plain", "plain")]
    with caplog.at_level(logging.WARNING, logger="llama2_jax.data.sft"):
        data = sft.make_sft_data(samples, CharTokenizer(), seq_len=64, batch_size=1, seed=0, val_fraction=0.0)
    assert data.stats.special_tags == 2 and "2 with special tags" in data.stats.summary()
    tagged = [r.getMessage() for r in caplog.records if "[INST]" in r.getMessage()]
    assert tagged == ["SFT data: 2 of 3 dialogs contain [INST], [/INST], <<SYS>> or <</SYS>> inside a message; they "
                      "are trained on as plain text (clean the data if that is not intended)"]


def test_sft_all_overlong_error_prints_the_counts():
    samples = [sample("a long question " * 5, "a long answer " * 5)] * 3
    with pytest.raises(ValueError) as error:
        sft.make_sft_data(samples, CharTokenizer(), seq_len=16, batch_size=1, seed=0, val_fraction=0.0,
                          overlong="drop")
    message = str(error.value)
    assert message == ("no training samples left of 3 dialogs (3 train, 0 held out; 3 samples longer than seq_len 16 "
                       "(0 truncated to whole turns, 0 cut mid-turn, 3 dropped), 0 without supervised tokens "
                       "dropped); raise seq_len, or keep overlong samples with overlong='truncate'")


def test_a_single_json_object_is_named_as_such(tmp_path):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps({"data": records}, indent=2))
    with pytest.raises(ValueError, match=r"pretty.json: the file is a single JSON object; expected a JSON list of "
                                         r"records or JSONL \(one record per line\) \(its list is under 'data'"):
        dialog_readers.read_dialogs(pretty)
    one_line = tmp_path / "one_line.json"
    one_line.write_text(json.dumps({"data": records}))
    with pytest.raises(ValueError, match=r"unknown dialog format .*one JSON object holding the records under 'data'"):
        dialog_readers.read_dialogs(one_line)
    broken = tmp_path / "broken.jsonl"  # a real JSONL with a bad line is still reported by line
    broken.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        dialog_readers.read_dialogs(broken)


def test_config_file_and_recipe_workdir_errors_are_one_line(tmp_path):
    """One subprocess, the trainers' and the recipe's flag parser (cli.common.parse_config_flags) then the recipe's
    main: a missing or misspelt --config file with an override, a config file with a syntax error or that raises, and
    a recipe --workdir that is a file or not writable."""
    regular = tmp_path / "file"
    regular.write_text("x")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("from configs import tiny\n\ndef get_config(:\n    return tiny.get_config()\n")
    raises = tmp_path / "raises.py"
    raises.write_text("def get_config():\n    return undefined_name\n")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    probes = [["--config=configs/nope.py", "--config.num_train_steps=3"],
              ["--config=configs/dpo_tny.py", "--config.seed=1", "--workdir=w"],
              [f"--config={syntax}"], [f"--config={syntax}", "--config.seed=3"], [f"--config={raises}"],
              ["--config=configs/recipe_tiny.py", f"--workdir={regular}"],
              ["--config=configs/recipe_tiny.py", f"--workdir={read_only}"]]
    script = (
        "import sys, tempfile\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "from llama2_jax.cli import common\n"
        "from train import recipe\n"
        "config_flags.DEFINE_config_file('config', None, 'config', lock_config=True)\n"
        "flags.DEFINE_string('workdir', None, 'workdir')\n"
        "def read_only(*args, **kwargs):  # what a read-only directory gives a non-root user (root writes anyway)\n"
        "    raise PermissionError(13, 'Permission denied')\n"
        "for argv in %r:\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    sys.argv = ['x', *argv]  # ml_collections reads the --config.X overrides from sys.argv\n"
        "    tempfile.TemporaryFile = read_only if 'read_only' in ' '.join(argv) else tempfile.TemporaryFile\n"
        "    try:\n"
        "        common.parse_config_flags(sys.argv)\n"
        "        recipe.main(['x'])\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code, flush=True)\n" % probes)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert result.stdout.splitlines() == ["exit 1"] * len(probes), result.stderr
    assert result.stderr.splitlines() == [
        "error: --config: [Errno 2] No such file or directory: 'configs/nope.py'",
        "error: --config: [Errno 2] No such file or directory: 'configs/dpo_tny.py'",
        f"error: --config: {syntax}:3: SyntaxError: invalid syntax",
        f"error: --config: {syntax}:3: SyntaxError: invalid syntax",
        f"error: --config: {raises}:2: NameError: name 'undefined_name' is not defined",
        f"error: --workdir: {regular} is a file, not a directory",
        f"error: --workdir: {read_only} is not writable (Permission denied)"]


def test_a_warmup_longer_than_the_run_is_cut_with_a_warning_naming_both(caplog):
    """--config.warmup_steps=1000 --config.num_train_steps=10 used to cut the warmup to 10 steps without a word. A run
    shorter than its config's warmup is how a shipped config is smoke-tested (configs/tiny.py warms up over 30 steps;
    the tests and the tiny recipe's short runs take 2-12), so it stays allowed, with one warning line."""
    from configs import tiny

    config = tiny.get_config()
    config.warmup_steps = 1000
    with caplog.at_level(logging.WARNING):
        _, schedule = initial_state.make_tx(config, 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["config.warmup_steps (1000) is longer than the run's 10 steps (config.num_train_steps, or the "
                        "steps of config.num_epochs): the learning rate warms up over all 10 steps, reaching its peak "
                        "at the last one, and does not decay"]
    np.testing.assert_allclose([schedule(1), schedule(10)], [config.learning_rate / 10, config.learning_rate],
                               rtol=1e-6)
    caplog.clear()
    config.warmup_steps = 10
    with caplog.at_level(logging.WARNING):
        initial_state.make_tx(config, 10)
    assert not caplog.records
