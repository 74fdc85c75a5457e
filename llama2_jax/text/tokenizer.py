"""SentencePiece tokenizer with Meta's Llama 2 semantics.

`Tokenizer.encode(text, bos, eos)` runs SentencePiece and optionally prepends BOS / appends EOS, exactly as Meta's
`llama/tokenizer.py`. The Llama 2 model has no pad piece (`pad_id == -1`).

`train_tokenizer` trains a new model with Llama 2's trainer settings (`LLAMA2_TRAINER_SPEC`), e.g. a small vocabulary
for the tiny config; `load_or_train_tokenizer` caches it in the workdir; `check_vocab` checks it against the model.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from llama2_jax.checkpoints.layout import TOKENIZER_FILE


class Tokenizer:
    """Thin wrapper around a SentencePiece model file."""

    def __init__(self, model_path: str | os.PathLike):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: tokenizer model file not found")
        self.model_path = model_path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as error:  # sentencepiece: "INTERNAL: could not parse ModelProto from ..."
            raise ValueError(f"{model_path}: not a SentencePiece model file ({error})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


# Llama 2's SentencePiece trainer settings, read back from Meta's `tokenizer.model` trainer_spec. Everything
# that decides how text is split is here; `input_sentence_size` / `num_threads` only change speed and sampling.
LLAMA2_TRAINER_SPEC: dict = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    character_coverage=0.99995,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    max_sentence_length=4192,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)

def _training_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Yields the non-empty lines of every document.

    SentencePiece treats each input as one "sentence" and silently drops sentences over `max_sentence_length` bytes, so
    documents are fed line by line. Newlines are then never learned as pieces and fall back to the byte `<0x0A>`, as in
    Llama 2. Lines still too long are cut (on a character boundary) rather than dropped.
    """
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_bytes:
                head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                yield head
                line = line[len(head):]
            if line:
                yield line


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    input_sentence_size: int = 2_000_000,
    num_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> Tokenizer:
    """Trains a SentencePiece BPE model with Llama 2's settings and writes `<model_prefix>.model`.

    Training reads `texts` (an iterable of documents, e.g. from `llama2_jax.data.sources`) straight from memory, so no
    temporary corpus file is written. To train from files, pass `sources.read_text_files(paths)`.

    Args:
      texts: documents (str). Each is split into lines; blank lines are skipped.
      model_prefix: output path without the `.model` suffix; parent directories are created.
      vocab_size: number of pieces, including <unk>, <s>, </s> and the 256 byte pieces (so it must be > 259 plus the
        number of distinct characters kept by `character_coverage`).
      input_sentence_size: at most this many lines are sampled (shuffled) for training; bounds time on big corpora.
      num_threads: trainer threads (default: all CPUs).
      seed: SentencePiece's random seed (line sampling), for reproducible models.
      verbose: show SentencePiece's training log.

    Returns:
      The trained `Tokenizer`.
    """
    model_path = pathlib.Path(f"{os.fspath(model_prefix)}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    spec = dict(LLAMA2_TRAINER_SPEC)
    lines = _training_lines(texts, spec["max_sentence_length"])
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            vocab_size=vocab_size,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
            **spec,
        )
    except RuntimeError as e:  # e.g. a vocabulary smaller than the characters to cover, or no text at all
        raise ValueError(f"training a tokenizer with vocab_size={vocab_size} failed: {e}") from None
    # Write then rename, so a crash (or a concurrent reader) never sees a half-written model file.
    tmp_path = model_path.with_name(model_path.name + ".tmp")
    tmp_path.write_bytes(model.getvalue())
    os.replace(tmp_path, model_path)
    return Tokenizer(model_path)


def load_or_train_tokenizer(workdir: str | os.PathLike, corpus_texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Returns `<workdir>/tokenizer.model`, training it on `corpus_texts` first if it does not exist yet.

    The cached model is reused as it is (so restarts and evaluations use the same ids); `corpus_texts` is then not read.
    A cached model with a different vocabulary size raises ValueError instead of being overwritten.
    """
    model_path = pathlib.Path(workdir) / TOKENIZER_FILE
    if model_path.is_file():
        tokenizer = Tokenizer(model_path)
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(
                f"{model_path} has {tokenizer.vocab_size} pieces but vocab_size={vocab_size} was asked for; "
                "delete the file to retrain it or use another workdir"
            )
        return tokenizer
    return train_tokenizer(corpus_texts, model_path.with_suffix(""), vocab_size)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises a one-line ValueError unless the tokenizer and the model embedding have the same vocabulary size."""
    if tokenizer.vocab_size != model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces but the model's vocab_size is "
            f"{model_vocab_size}; they must be equal"
        )
