"""Data: document sources, packing into the project's batch format, and the Grain pretraining pipeline.

Batch format (dict of numpy arrays, [B, T]): `inputs`, `targets`, `segment_ids`, `positions` (int32) and `loss_mask`
(float32); see `llama2_jax.data.packing` for the exact meaning.
"""

from llama2_jax.data.packing import FEATURES, pack_documents, pack_examples, unigram_entropy
from llama2_jax.data.pipeline import make_eval_batches, make_pretrain_iterators, make_train_dataset, split_documents
from llama2_jax.data.sources import SOURCES, default_corpus, load_documents, read_jsonl, read_text_files, tfds_documents

__all__ = [
    "FEATURES",
    "SOURCES",
    "default_corpus",
    "load_documents",
    "make_eval_batches",
    "make_pretrain_iterators",
    "make_train_dataset",
    "pack_documents",
    "pack_examples",
    "read_jsonl",
    "read_text_files",
    "split_documents",
    "tfds_documents",
    "unigram_entropy",
]
