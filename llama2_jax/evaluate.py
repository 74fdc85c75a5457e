"""`python -m llama2_jax.evaluate`: lm-evaluation-harness and reward-model evaluation. The flags live in llama2_jax/cli/evaluate.py, the
library code in llama2_jax.evaluation."""

import sys

if __name__ == "__main__":
    from llama2_jax.cli.evaluate import main

    sys.exit(main())
