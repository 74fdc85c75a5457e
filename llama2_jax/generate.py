"""`python -m llama2_jax.generate`: Sampling from a checkpoint. The flags live in llama2_jax/cli/generate.py, the
library code in llama2_jax.inference.generate."""

import sys

if __name__ == "__main__":
    from llama2_jax.cli.generate import main

    sys.exit(main())
