"""Base configuration shared by every trainer: model, mesh, optimizer, loop, data, tokenizer and the RLHF fields.

Size and task configs import this file (or a parent that does) and override only what differs; fields only one
trainer reads are added, commented, by that trainer's parent config (configs/sft_7b.py, rm_helpful_7b.py, rs_7b.py,
ppo_7b.py). Any field can be overridden on the command line, e.g. `--config.num_train_steps=20 --config.mesh.fsdp=8`.
The tiny CPU configs apply `cpu_overrides`.
"""

import ml_collections
from ml_collections import config_dict

from llama2_jax.model.config import get_config as get_model_config


def model_config(preset: str) -> ml_collections.ConfigDict:
    """The `LlamaConfig` fields of a preset as a ConfigDict (`hidden_dim` is left to Meta's rule)."""
    fields = get_model_config(preset).to_dict()
    model = ml_collections.ConfigDict(fields)
    # Optional integers/floats are placeholders so they stay overridable from the command line.
    model.hidden_dim = config_dict.placeholder(int)  # None = Meta's FFN rule from dim/multiple_of/multiplier
    model.ffn_dim_multiplier = config_dict.placeholder(float) if fields["ffn_dim_multiplier"] is None \
        else fields["ffn_dim_multiplier"]
    return model


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # --- model: every field of llama2_jax.model.config.LlamaConfig ---
    config.model = model_config("7b")

    # --- mesh: device axes (one may be -1 = the remaining devices) ---
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1  # pure data parallelism (params replicated)
    config.mesh.fsdp = -1  # data parallelism with params/grads/optimizer state sharded (ZeRO-3)
    config.mesh.tensor = 1  # tensor parallelism inside heads and the MLP

    # --- batch ---
    config.batch_size = 1024  # global sequences per optimizer step (1024 x 4096 = 4M tokens, the paper's batch)
    config.seq_len = 4096  # tokens per sequence (the model's context length)
    config.grad_accum_steps = 1  # micro-batches per step: each is batch_size / grad_accum_steps sequences

    # --- optimizer (paper section 2.2) ---
    config.learning_rate = 3e-4  # peak learning rate
    config.warmup_steps = 2000  # linear warmup from 0 (a run shorter than this warms up over all of it: warned)
    config.lr_end_fraction = 0.1  # cosine decay to 10 % of the peak at num_train_steps
    config.adam_b1 = 0.9
    config.adam_b2 = 0.95
    config.adam_eps = 1e-5
    config.weight_decay = 0.1  # decoupled (AdamW), matrices only
    config.grad_clip = 1.0  # global-norm clipping; 0 disables

    # --- loop (Flax examples' names) ---
    config.seed = 0  # parameter init and data order
    config.num_train_steps = 476_837  # 2T tokens / (1024 x 4096) tokens per step
    config.log_every_steps = 50  # metrics to the progress bar, metrics.jsonl and TensorBoard
    config.eval_every_steps = 1000  # validation loss and perplexity
    config.eval_batches = 16  # validation batches per eval (0 = the whole held-out split)
    # lm-eval tasks run in process during pretraining / SFT / DPO (llama2_jax.training.task_evals; the [eval] extra),
    # logged as eval/<task>/<metric>
    config.eval_tasks = ""  # comma-separated task names, e.g. "text_perplexity,piqa_local"; "" = none
    config.eval_tasks_every_steps = 1000  # their cadence (and always at the last step)
    config.eval_tasks_limit = 0  # documents per task (0 = all)
    config.eval_tasks_num_fewshot = 0  # few-shot examples per prompt
    config.eval_tasks_metadata = ""  # the tasks' arguments as KEY=VALUE,...: e.g. "text_path=FILE,piqa_path=FILE"
    config.num_epochs = 0.0  # > 0: passes over the data, num_train_steps computed from them (SFT, RM); 0 = use
    # num_train_steps (the one "use num_train_steps" value everywhere; it works from the command line)
    config.checkpoint_every_steps = 1000  # async Orbax checkpoint
    config.keep_checkpoints = 3  # how many recent checkpoints to keep
    config.async_checkpoints = True  # write checkpoints in the background
    config.progress_bar = True  # tqdm bar on process 0
    config.init_from = ""  # "" = random init; else a converted JAX checkpoint dir or a trainer workdir, whose
    # architecture (llama_config.json) replaces config.model's; of config.model only the numerics are then used
    # (LlamaConfig.NUMERICS_FIELDS: dtype, param_dtype, scan_layers, remat_policy, attention_impl,
    # attention_block_size, attention_kv_block_size, attention_interpret)

    # --- data (llama2_jax.data.sources) ---
    config.data = ml_collections.ConfigDict()
    config.data.source = "default"  # default (embedded pydoc corpus) | text | jsonl | tfds
    config.data.path = ""  # text: file, directory or glob; jsonl: file(s); tfds: dataset name, e.g. "c4/en:3.1.0"
    config.data.field = "text"  # JSONL / TFDS field holding the document text
    config.data.split = "train"  # TFDS split
    config.data.data_dir = ""  # TFDS data_dir ("" = TFDS default)
    config.data.one_doc_per_file = False  # text: a whole file is one document (default: blank-line paragraphs)
    config.data.val_fraction = 0.01  # documents held out for validation

    # --- tokenizer ---
    config.tokenizer = ml_collections.ConfigDict()
    config.tokenizer.path = ""  # a SentencePiece .model; "" = INIT_FROM/tokenizer.model, else one trained on the
    # corpus and cached in the workdir (pretraining, RM; the others need one). It is copied into the workdir.
    config.tokenizer.train_vocab_size = 32000  # vocabulary when training one (must equal model.vocab_size)

    # --- end of run ---
    config.sample_prompts = ("The", "In Python,")  # greedy samples printed at the end ("" to skip)
    config.sample_tokens = 48

    # --- RLHF (rejection sampling, PPO; paper section 3.2.3): reward models, prompts, sampling ---
    config.reward = ml_collections.ConfigDict()
    config.reward.helpful_path = ""  # Helpfulness RM workdir (train.reward); "" = use the safety RM alone
    config.reward.safety_path = ""  # Safety RM workdir; "" = use the helpful RM alone (not both empty)
    config.reward.safety_threshold = 0.15  # paper: Rc = Rs if is_safety(prompt) or Rs < 0.15, else Rh

    config.prompts = ml_collections.ConfigDict()
    config.prompts.path = ""  # JSONL {"prompt": str | [messages], "is_safety": bool} or a preference file
    config.prompts.format = "auto"  # auto | prompts | jsonl | hh | hh_prompt | oasst_pairs (preferences' formats)
    config.prompts.is_safety = config_dict.placeholder(bool)  # None = the records' tags; true/false = force
    config.prompts.on_error = "raise"  # malformed records: raise (file:line) | skip (counted and logged)
    config.prompts.max_prompts = 0  # use the first N prompts that fit in max_prompt_len; 0 = all
    config.prompts.max_prompt_len = 1024  # longer prompts are dropped (counted); also the padded prompt width
    config.prompts.val_fraction = 0.0  # PPO: prompts held out for eval_reward_* (RS uses every prompt)

    config.sampling = ml_collections.ConfigDict()
    config.sampling.temperature = 1.0  # softmax(logits / T) of the policy
    config.sampling.top_p = 1.0  # nucleus sampling; 1 = plain temperature sampling
    config.sampling.max_gen_len = 1024  # new tokens per response
    config.rollout = ml_collections.ConfigDict()  # how RS, PPO, GRPO and context distillation sample (docs/rlhf.md)
    config.rollout.engine = "slots"  # slots: decode slots, a finished answer's slot takes the next prompt | batch:
    # fixed batches decoded until their longest answer ends (decode.sample inside the trainers' jit)
    config.rollout.slots = 0  # decode slots; 0 = the rows of one sampling call (batch_size / sampling.batch_size)
    config.iterations = 1  # RS rounds / PPO iterations in this run

    # --- ecosystem: streamed HF data, experiment tracking, profiling (llama2_jax.training.loop) ---
    config.data.streaming = False  # source "hf" only: stream the corpus instead of loading it (exact resume still)
    config.data.shuffle_window = 1024  # streaming: documents shuffled together (1 = stored order)
    config.wandb = ml_collections.ConfigDict()
    config.wandb.project = ""  # "" = no Weights & Biases; else the same scalars as metrics.jsonl go to this project
    config.wandb.entity = ""  # W&B team or user ("" = your default)
    config.wandb.mode = "online"  # online | offline (files under WORKDIR/wandb, `wandb sync` later) | disabled
    config.wandb.name = ""  # display name of the run ("" = W&B's)
    config.profile_steps = ""  # "START:STOP": a jax.profiler trace of steps START..STOP into WORKDIR/profile

    # --- LoRA (Hu et al. 2021; llama2_jax/model/lora.py): train.sft, train.reward, train.dpo ---
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 0  # 0 = off (full fine-tuning); r > 0 = adapters of rank r on the frozen init_from base
    config.lora.alpha = 16.0  # the update is scaled by alpha / rank
    config.lora.dropout = 0.0  # dropout on the adapters' input while training
    config.lora.targets = "wq,wk,wv,wo,w1,w2,w3"  # comma-separated kernels to adapt (attention and MLP)
    config.lora.dtype = "float32"  # storage dtype of the adapters and their optimizer state
    return config


def cpu_overrides(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The settings of the tiny configs that run on a laptop CPU: float32 compute (bfloat16 matmuls are emulated,
    slowly, on CPU), unrolled layers (4 layers compile as fast), no remat, pure data parallelism."""
    config.model.dtype = "float32"
    config.model.scan_layers = False
    config.model.remat_policy = "none"
    config.mesh.data = -1
    config.mesh.fsdp = 1
    return config
