"""`python -m llama2_jax.serve`: the command line lives in llama2_jax/cli/serve.py."""

if __name__ == "__main__":
    from llama2_jax.cli.serve import main

    main()
