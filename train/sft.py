r"""Supervised fine-tuning (paper section 3.1): `python -m train.sft --config=configs/sft_7b.py --workdir=DIR
    --config.init_from=CKPT --config.data.path=FILE [--config.FIELD=VALUE ...]`.

The same set-up, state, step and loop as pretraining (`training.setup` with `sft_run.SFT`, then
`sft_run.train_sft` -> `train_next_token`); only the data (packed dialogs, `llama2_jax.data.sft`) and the loss mask
(assistant tokens only; `next_token_loss` already honours `loss_mask`) differ.

* Model: with `config.init_from` set, the architecture is `CKPT/llama_config.json`; `config.model` contributes only
  the numerics (`LlamaConfig.NUMERICS_FIELDS`). `max_seq_len` (no parameter depends on it) is raised to
  `config.seq_len` when that is longer, with a warning: RoPE positions past the pretraining context are then learned
  during SFT. Without init_from (random init) `config.model` is used whole.
* Tokenizer: `config.tokenizer.path`, or "" = `CKPT/tokenizer.model`. It is copied into the workdir, which then is
  a complete init_from / checkpoint for generation, GAtt or a further SFT round.
* Steps: `config.num_epochs` > 0 sets num_train_steps = ceil(epochs x packed rows per epoch / batch_size).
* Eval: the loss on assistant tokens of the held-out dialogs; with `config.eval_at_start` also before training.
* LoRA: `--config.lora.rank=R` (> 0) trains only adapters on the frozen init_from (`training.lora_run`); the
  workdir then holds the adapters and records its base (lora_config.json), and loads merged wherever params load.
"""

from __future__ import annotations

import jax

from llama2_jax.cli import trainer as trainer_main
from llama2_jax.inference import generate
from llama2_jax.training import sft_run
from llama2_jax.training.loop import TrainResult, exit_if_interrupted
from llama2_jax.training.setup import Run, setup


def train_and_evaluate(config, workdir: str) -> TrainResult:
    """Fine-tune on the dialogs of config.data.path."""
    run = setup(config, workdir, sft_run.SFT)
    result = exit_if_interrupted(sft_run.train_sft(run))
    report(run, result)
    return result


def report(run: Run, result: TrainResult) -> None:
    if jax.process_index() != 0:
        return
    config = run.config
    evals = [(h["step"], h["eval_loss"]) for h in result.history if "eval_loss" in h]
    if evals:
        trail = ", ".join(f"step {s}: {loss:.4f}" for s, loss in evals)
        fraction = result.summary["data"].supervised_fraction
        print(f"eval loss on assistant tokens (supervised fraction {fraction:.1%}): {trail}")
    prompts = [p for p in config.sample_prompts if p]
    if prompts and config.sample_tokens > 0 and jax.process_count() == 1:
        dialogs = [[{"role": "user", "content": p}] for p in prompts]
        params = sft_run.trained_params(result, run.model_cfg)
        results = generate.chat_completion(params, run.model_cfg, run.tokenizer, dialogs,
                                           temperature=0.0, max_gen_len=config.sample_tokens)
        for prompt, sample in zip(prompts, results):
            print(f"--- [INST] {prompt} [/INST]\n{sample['generation']['content']}")


if __name__ == "__main__":
    trainer_main.run_trainer(train_and_evaluate, "SFT config file (configs/sft_*.py).")
