"""The tokenizer of a run: config.tokenizer.path, else init_from's tokenizer.model, else the one a resumed run cached
in its workdir, else one trained on the run's texts (pretraining, reward models). Nothing is written here: a newly
trained tokenizer waits in a temporary directory until the run's checks have all passed (`training.setup` then copies
it into the workdir). Errors are one-line ConfigErrors naming the field.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Iterable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama2_jax.checkpoints.layout import TOKENIZER_FILE
from llama2_jax.text.tokenizer import Tokenizer, check_vocab, train_tokenizer
from llama2_jax.training.checks import ConfigError


def tokenizer_path(config) -> str:
    """config.tokenizer.path, else INIT_FROM/tokenizer.model when it exists, else ""."""
    if config.tokenizer.path:
        return config.tokenizer.path
    inherited = os.path.join(config.init_from, TOKENIZER_FILE) if config.init_from else ""
    return inherited if inherited and os.path.isfile(inherited) else ""


def find_tokenizer(config, vocab_size: int, *, workdir: str = "", trainable: bool = False) -> Optional[Tokenizer]:
    """`tokenizer_path(config)`, else WORKDIR/tokenizer.model of a resumed run; None when there is neither and the
    run can train one (`trainable`), else a ConfigError. The vocabulary must equal the model's."""
    path = tokenizer_path(config)
    cached = os.path.join(workdir, TOKENIZER_FILE) if workdir else ""
    if not path and cached and os.path.isfile(cached):  # the ids of a resumed run stay the ones it trained with
        path = cached if trainable else ""
    if not path:
        if trainable:
            return None
        candidate = os.path.join(config.init_from, TOKENIZER_FILE) if config.init_from else ""
        where = f"and {candidate} does not exist" if candidate else "and config.init_from is empty"
        raise ConfigError(f"config.tokenizer.path is empty {where}; pass --config.tokenizer.path=FILE")
    return _checked(lambda: Tokenizer(path), vocab_size)


def train_run_tokenizer(config, vocab_size: int, texts: Iterable[str]) -> Tokenizer:
    """A tokenizer of config.tokenizer.train_vocab_size pieces trained on `texts` (by process 0, sent to the
    others), in a temporary directory until the run's workdir is written."""
    return _checked(lambda: _train_everywhere(texts, config.tokenizer.train_vocab_size), vocab_size)


def load_tokenizer(config, vocab_size: int, *, workdir: str = "", texts: Optional[Iterable[str]] = None) -> Tokenizer:
    """`find_tokenizer`, else one trained on `texts` (`train_run_tokenizer`), or a ConfigError without texts."""
    tokenizer = find_tokenizer(config, vocab_size, workdir=workdir, trainable=texts is not None)
    return tokenizer if tokenizer is not None else train_run_tokenizer(config, vocab_size, texts)


def _checked(make, vocab_size: int) -> Tokenizer:
    try:
        tokenizer = make()
        check_vocab(tokenizer, vocab_size)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"config.tokenizer: {error}") from None
    return tokenizer


def _train_everywhere(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A tokenizer trained by process 0 into a temporary directory; its bytes are broadcast, so every process loads
    the same model without a shared file system."""
    staging = tempfile.mkdtemp(prefix="llama2_jax_tokenizer_")
    atexit.register(shutil.rmtree, staging, True)
    model_path = os.path.join(staging, TOKENIZER_FILE)
    if jax.process_index() == 0:
        train_tokenizer(texts, os.path.join(staging, "tokenizer"), vocab_size)
    if jax.process_count() > 1:
        data = np.fromfile(model_path, np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
        size = int(multihost_utils.broadcast_one_to_all(np.asarray(data.size, np.int64)))
        padded = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
        data = np.asarray(multihost_utils.broadcast_one_to_all(padded))
        if jax.process_index() != 0:
            data.tofile(model_path)
    return Tokenizer(model_path)
