"""The model: what a Llama 2 network is and how its weights are laid out on devices.

  config     LlamaConfig (frozen), the 7B/13B/34B/70B presets (get_config), NUMERICS_FIELDS
  llama      the Llama module (one forward, with or without a KV cache), abstract_params, project
  attention  the attention kernels behind one function (xla | chunked | cudnn | splash)
  lora       LoRA adapters (LoraConfig, merge, the adapter-only parameter tree)
  score      the score head on a Llama trunk: reward (last token) and value (every position) models
  sharding   make_mesh and the one logical-axis rules table (LOGICAL_RULES), activation constraints
"""
