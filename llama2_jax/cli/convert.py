"""`python -m llama2_jax.convert`: weights between HF, Meta and our format (see llama2_jax/checkpoints/convert.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from llama2_jax.checkpoints import convert as conv
from llama2_jax.checkpoints.convert import DEFAULT_MAX_SHARD_SIZE, DTYPES, FORMATS, convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama2_jax.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(conv.__doc__.split("\n\n")[:2]),
        epilog="formats:\n  hf    HF transformers folder: config.json + safetensors or pytorch_model*.bin\n"
               "  meta  Meta folder: params.json + consolidated.NN.pth\n"
               "  jax   ours: llama_config.json + params/ (Orbax); as --src also a trainer workdir (latest step)")
    parser.add_argument("--from", dest="src_format", required=True, choices=FORMATS, help="source format")
    parser.add_argument("--to", dest="dst_format", required=True, choices=FORMATS + ("peft",), help="target format")
    parser.add_argument("--src", required=True, help="source folder")
    parser.add_argument("--dst", required=True, help="destination folder (new or empty)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="cast the weights (default: float32 for --to=jax, else the source's dtype)")
    parser.add_argument("--num_shards", type=int, default=None,
                        help="Meta model-parallel shards for --to=meta (default by size: 7B 1, 13B 2, 34B 4, 70B 8, "
                             "else 1)")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors file for --to=hf, e.g. 5GB, 500MB (default %(default)s)")
    parser.add_argument("--merge_lora", action="store_true", help="--src is a LoRA dir: write base + adapters merged")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece tokenizer.model to export with --to=hf (tokenizer.json for AutoTokenizer)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        convert(args.src_format, args.dst_format, args.src, args.dst, dtype=args.dtype, num_shards=args.num_shards,
                max_shard_size=args.max_shard_size, merge_lora=args.merge_lora, tokenizer=args.tokenizer)
    except (ValueError, OSError, KeyError, ImportError) as e:  # OSError: FileNotFoundError, FileExistsError, ENOSPC
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({args.dst_format} format)")
    return 0
