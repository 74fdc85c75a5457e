"""`python -m llama2_jax.plan`: the TPU configuration planner. The flags live in llama2_jax/cli/plan.py, the search
in llama2_jax.accel.planner."""

import sys

if __name__ == "__main__":
    from llama2_jax.cli.plan import main

    sys.exit(main())
