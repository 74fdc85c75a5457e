"""SFT and preference records from a dataset instead of a file: `hf:PATH_OR_NAME[@SPLIT]` or `tfds:NAME_OR_DIR[@SPLIT]`.

Wherever a dialog or preference reader takes a file (`dialogs.read_dialogs`, `sft.read_sft_samples`,
`preferences.read_preferences`, `config.data.path` of the SFT and reward trainers) it also takes such a spec:

* `hf:PATH_OR_NAME[@SPLIT]`: rows of `datasets.load_dataset` (a local Parquet/JSON/Arrow file or directory, or a hub
  name in the local cache; see `hf_source`), read as a stream. Split default "train".
* `tfds:NAME[@SPLIT]` or `tfds:DIR[@SPLIT]`: examples of `tfds.data_source(NAME)` (TFDS_DATA_DIR or TFDS's default
  directory), or of the prepared dataset in DIR (the folder holding `dataset_info.json`, e.g.
  `~/tensorflow_datasets/my_sft/1.0.0`). ArrayRecord format; TensorFlow is not needed. TFDS values become plain
  Python: bytes -> str, arrays -> lists, and a nested `Sequence(FeaturesDict)` (TFDS stores it as a dict of lists)
  -> a list of dicts, so `{"messages": [{"role", "content"}, ...]}` reads as in a JSONL file.

Records then go through the same format detection, converters and error rules as file records; a location is
`"<spec>: record <i>"` (0-based).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

PREFIXES = ("hf:", "tfds:")


def is_dataset_spec(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(PREFIXES)


def parse_spec(spec: str) -> tuple[str, str, str]:
    """`"hf:x.parquet@test"` -> `("hf", "x.parquet", "test")`; the split defaults to "train"."""
    kind, _, rest = spec.partition(":")
    name, at, split = rest.rpartition("@") if "@" in rest else (rest, "", "train")
    if kind + ":" not in PREFIXES or not name or (at and not split):
        raise ValueError(f"{spec}: expected hf:PATH_OR_NAME[@SPLIT] or tfds:NAME_OR_DIR[@SPLIT]")
    return kind, name, split


def to_python(value: Any, nested: bool = False) -> Any:
    """A TFDS example value as JSON-like Python (see the module docstring)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [to_python(v, True) for v in value.tolist()] if value.ndim else to_python(value.item(), nested)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_python(v, True) for v in value]
    if isinstance(value, dict):
        plain = {k: to_python(v, True) for k, v in value.items()}
        lengths = {len(v) if isinstance(v, list) else -1 for v in plain.values()}
        if nested and plain and len(lengths) == 1 and -1 not in lengths:  # Sequence(FeaturesDict): dict of lists
            return [dict(zip(plain, row)) for row in zip(*plain.values())]
        return plain
    return value


def tfds_source(name: str, split: str):
    """`tfds.data_source(name, split=split)`, or the prepared dataset in directory `name`. One-line ValueErrors."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise ImportError("TFDS is not installed: pip install -e .[tfds]") from None
    try:
        if os.path.isdir(name):
            return tfds.builder_from_directory(name).as_data_source(split=split)
        return tfds.data_source(name, split=split)
    except Exception as error:  # DatasetNotFoundError, unknown split (ValueError), missing files...
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"tfds:{name}@{split}: {first_line}") from None


def iter_dataset_records(spec: str) -> Iterator[tuple[str, Any]]:
    """Yield `(location, record)` for every record of a dataset spec, in stored order."""
    kind, name, split = parse_spec(spec)
    if kind == "hf":
        from llama2_jax.data import hf_source  # pylint: disable=g-import-not-at-top

        yield from hf_source.iter_hf_records(name, split)
        return
    source = tfds_source(name, split)
    for i in range(len(source)):
        yield f"tfds:{name}@{split}: record {i}", to_python(source[i])
