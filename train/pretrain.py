r"""Pretraining: `python -m train.pretrain --config=configs/7b.py --workdir=DIR [--config.FIELD=VALUE ...]`.

The embedded default trains offline on CPU: `python -m train.pretrain --config=configs/tiny.py --workdir=/tmp/tiny`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional

import jax

from llama2_jax.cli import trainer as trainer_main
from llama2_jax.data import hf_source, packing, pipeline, sources
from llama2_jax.inference import generate
from llama2_jax.training.checks import ConfigError
from llama2_jax.training.hosts import process_local
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.setup import Run, Task, setup
from llama2_jax.training.sft_run import train_next_token

STREAM_TOKENIZER_DOCS = 20_000  # a streamed corpus trains the tokenizer on its first documents


def load_corpus(config):
    """The configured documents: a random-access sequence, or for `data.streaming` a (train, validation) pair of
    `hf_source.StreamingDocuments` (validation None when data.val_fraction is 0)."""
    data = config.data
    try:
        if data.get("streaming", False):
            if data.source != "hf":
                raise ValueError(f"streaming=True needs source='hf' (source is {data.source!r})")
            return hf_source.streaming_documents(
                data.path, split=data.split, field=data.field, val_fraction=data.val_fraction,
                window=data.shuffle_window, seed=config.seed, cache_dir=data.data_dir or None)
        return sources.load_documents(data.source, data.path or None, field=data.field, split=data.split,
                                      data_dir=data.data_dir or None, one_doc_per_file=data.one_doc_per_file)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise ConfigError(f"config.data: {error}") from None


def tokenizer_corpus(documents):
    """Texts to train a tokenizer on: the documents, or the first STREAM_TOKENIZER_DOCS training documents of a stream
    (one pass: a short stream is not repeated)."""
    if isinstance(documents, tuple):
        return itertools.islice(iter(documents[0].one_pass()), STREAM_TOKENIZER_DOCS)
    return documents


@dataclasses.dataclass
class Corpus:
    documents: Any  # what load_corpus returned
    train_iter: Any  # this process's rows of every global batch
    eval_batches: Optional[Callable[[], list]]  # this process's rows of the held-out batches, or None


def make_data(config, tokenizer, documents) -> Corpus:
    """The corpus tokenized and packed into batches. Every process reads the global stream."""
    try:
        if isinstance(documents, tuple):  # streamed: (train, validation) document streams
            train_iter, eval_batches = pipeline.make_stream_pretrain_iterators(
                *documents, tokenizer, config.seq_len, config.batch_size, process_index=0, process_count=1,
                max_eval_batches=config.eval_batches or None)
        else:
            train_iter, eval_batches = pipeline.make_pretrain_iterators(
                documents, tokenizer, config.seq_len, config.batch_size, config.seed, config.data.val_fraction,
                process_index=0, process_count=1, max_eval_batches=config.eval_batches or None)
    except ValueError as error:
        raise ConfigError(f"config.data ({corpus_name(config)}): {error}") from None
    return Corpus(documents, *process_local(train_iter, eval_batches))


def corpus_name(config) -> str:
    """The configured corpus in words, for errors: "source 'text' /data/a.txt" or "the default corpus"."""
    data = config.data
    return "the default corpus" if data.source == "default" else f"source {data.source!r} {data.path}"


def corpus_unigram_entropy(documents, tokenizer) -> float:
    return packing.unigram_entropy([pipeline.encode_document(tokenizer, doc) for doc in documents])


PRETRAIN = Task("pretrain", read=load_corpus, texts=tokenizer_corpus, make_data=make_data)


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """Pretrain a Llama on the configured corpus (from scratch, or continued from config.init_from). The tokenizer is
    config.tokenizer.path, init_from's, or one trained on the corpus."""
    run = setup(config, workdir, PRETRAIN)
    result = exit_if_interrupted(train_next_token(run, run.data.train_iter, run.data.eval_batches))
    report(run, result.state, result.history)
    return result


def report(run: Run, state, history) -> None:
    if jax.process_index() != 0:
        return
    config, model_cfg, tokenizer = run.config, run.model_cfg, run.tokenizer
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if evals and config.data.source == "default":
        entropy = corpus_unigram_entropy(run.data.documents, tokenizer)
        print(f"validation loss {evals[-1]:.4f} nats/token vs unigram entropy of the corpus {entropy:.4f} nats/token")
    prompts = [p for p in config.sample_prompts if p]
    if prompts and config.sample_tokens > 0 and jax.process_count() == 1:
        results = generate.text_completion(jax.device_get(state.params), model_cfg, tokenizer, prompts,
                                           temperature=0.0, max_gen_len=config.sample_tokens, echo=True)
        for result in results:
            print(f"--- sample ---\n{result['generation']}")


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "Trainer config file (configs/*.py).")
