"""`python -m llama2_jax.convert`: Checkpoint conversion (HF / Meta / PEFT <-> ours). The flags live in llama2_jax/cli/convert.py, the
library code in llama2_jax.checkpoints.convert."""

import sys

if __name__ == "__main__":
    from llama2_jax.cli.convert import main

    sys.exit(main())
