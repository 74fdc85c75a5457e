"""Export a Llama 2 SentencePiece model as an HF `tokenizers` tokenizer that `AutoTokenizer.from_pretrained` loads.

Why not `LlamaTokenizer(vocab_file=...)`: in transformers 5 `LlamaTokenizer` is the `tokenizers`-backed class, which
ignores `vocab_file` and builds a 3-piece vocabulary (<unk>, <s>, </s>) that encodes all text to `[]`. Loading the
`.model` through `LlamaTokenizer.from_pretrained` is no better for our purpose: it builds the non-legacy pipeline
(Metaspace, prefix only when the text does not already start with a space), so `" foo"` loses SentencePiece's
dummy-prefix piece "▁" and continuation token counts change.

The tokenizer here is built from the model file itself, with SentencePiece's own rules for a Llama-style BPE model:
  * vocabulary: every piece at its id; merges: every (left, right) split of a normal piece into two normal pieces,
    ranked by the merged piece's score (higher first), as SentencePiece's BPE merges by piece score;
  * normalizer: prepend "▁" always (add_dummy_prefix, also before a leading space), then spaces -> "▁";
  * byte fallback for characters outside the vocabulary; decoder: "▁" -> " ", bytes, strip the one leading space;
  * post-processor: BOS in front (as Meta's `encode(..., bos=True)` and HF's Llama tokenizers).
The saved `tokenizer_config.json` names the generic fast class, so the file is loaded as written (transformers 4 and
5). Literal "<s>" / "</s>" in text become the special ids in HF (as with Meta's published HF tokenizer) but plain
pieces in SentencePiece; every other text encodes identically (tests/text/test_hf_tokenizer.py).
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Optional

NORMAL_PIECE = 1  # sentencepiece_model.proto ModelProto.SentencePiece.Type.NORMAL
BPE_MODEL = 2  # TrainerSpec.ModelType.BPE
SPACE_PIECE = "\u2581"  # "▁"
TOKENIZER_MODEL_FILE = "tokenizer.model"


def _load_proto(model_path: str | os.PathLike):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(pathlib.Path(model_path).read_bytes())
    return proto


def _check_supported(proto, model_path) -> None:
    """The export reproduces Llama 2's SentencePiece settings; refuse models it would encode differently."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != BPE_MODEL:
        problems.append("model_type is not BPE")
    if not spec.byte_fallback:
        problems.append("byte_fallback is off")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not norm.add_dummy_prefix:
        problems.append("add_dummy_prefix is off")
    if norm.precompiled_charsmap:
        problems.append(f"normalization {norm.name!r} is not 'identity'")
    if problems:
        raise ValueError(f"{model_path}: cannot export this SentencePiece model to HF ({'; '.join(problems)}); "
                         "only Llama-2-style BPE models are supported")


def bpe_merges(proto) -> list[tuple[str, str]]:
    """(left, right) merges of normal pieces, highest merged-piece score first (ties: lower id first)."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL_PIECE}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def build_hf_tokenizer(model_path: str | os.PathLike, model_max_length: Optional[int] = None):
    """A `transformers.PreTrainedTokenizerFast` that encodes like `sentencepiece` on `model_path` (+ BOS)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    proto = _load_proto(model_path)
    _check_supported(proto, model_path)
    spec = proto.trainer_spec
    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    unk, bos, eos = pieces[spec.unk_id], pieces[spec.bos_id], pieces[spec.eos_id]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, fuse_unk=True,
                                   byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_PIECE), normalizers.Replace(" ", SPACE_PIECE)])
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.bos_id)])
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
                                   clean_up_tokenization_spaces=False, **kwargs)


def check_export(tokenizer_path: Optional[str], dst_format: str) -> None:
    """convert's check, before any weight is read: a tokenizer is exported with --to=hf only, from a file."""
    if tokenizer_path is None:
        return
    if dst_format != "hf":
        raise ValueError(f"--tokenizer={tokenizer_path}: only --to=hf exports a tokenizer")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"--tokenizer={tokenizer_path}: tokenizer model file not found")


def save_hf_tokenizer(model_path: str | os.PathLike, dst: str | os.PathLike,
                      model_max_length: Optional[int] = None) -> None:
    """Write tokenizer.json + tokenizer_config.json (loadable by `AutoTokenizer.from_pretrained(dst)`) and a copy
    of the SentencePiece `tokenizer.model` (for Meta's and SentencePiece's tools) into `dst`."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"--tokenizer {model_path}: tokenizer model file not found")
    tokenizer = build_hf_tokenizer(model_path, model_max_length)
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dst)
    shutil.copyfile(model_path, dst / TOKENIZER_MODEL_FILE)
