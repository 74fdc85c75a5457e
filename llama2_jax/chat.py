"""`python -m llama2_jax.chat`: An interactive chat with a checkpoint in Meta's format. The flags live in llama2_jax/cli/chat.py, the
library code in llama2_jax.text.chat_format."""

import sys

if __name__ == "__main__":
    from llama2_jax.cli.chat import main

    sys.exit(main())
