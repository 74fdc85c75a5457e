"""`python -m llama2_jax.generate`: complete prompts with a Llama 2 checkpoint (Meta's text_completion).

  python -m llama2_jax.generate --checkpoint=DIR --tokenizer=PATH --prompt="Once upon a time" [--prompt=...]
      [--max_gen_len=N --temperature=0.6 --top_p=0.9 --seed=1 --dtype=float32 --echo]
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from llama2_jax.cli.common import add_sampling_flags, check_sampling_flags, check_utf8, fail, load_model_or_exit
from llama2_jax.inference.generate import text_completion


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags, checked (`error: ...` and exit 1 on a bad value)."""
    parser = argparse.ArgumentParser(prog="python -m llama2_jax.generate", description=__doc__.split("\n")[0])
    add_sampling_flags(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    parser.add_argument("--echo", action="store_true", help="print the prompt too (decoded with the completion)")
    args = parser.parse_args(argv)
    check_sampling_flags(args)
    for prompt in args.prompt:
        check_utf8(prompt, "--prompt")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    params, cfg, tokenizer = load_model_or_exit(args)
    try:  # prompts are checked (length, token ids) before anything is compiled
        results = text_completion(params, cfg, tokenizer, args.prompt, temperature=args.temperature,
                                  top_p=args.top_p, max_gen_len=args.max_gen_len, echo=args.echo, rng=args.seed)
    except ValueError as error:
        fail(f"--prompt: {error}")
    for result in results:
        # the completion alone, as Meta's text_completion returns it; --echo decodes prompt and completion together
        # (pasting the prompt string in front would lose the space SentencePiece folds into the first new token)
        print(result["generation"])
        if len(results) > 1:
            print("\n==================================\n")


if __name__ == "__main__":
    main()
