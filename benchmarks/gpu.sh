#!/usr/bin/env bash
# The whole GPU table in one command, in at most ~8 minutes on one H100/H200, offline:
#
#   bash benchmarks/gpu.sh            # from anywhere; PYTHON=... to pick the interpreter (default: python3)
#
# 1. device line (GPU, driver, jax/flax/optax/torch/transformers versions);
# 2. training step on the issue's anchor config (dim 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632, vocab 32000,
#    seq 2048 — TinyLlama-1.1B's shape), bf16 compute, float32 master weights, AdamW, batch 8 (4 if 8 runs out of
#    memory):
#      ours (llama2_jax.training.state.jit_train_step, cuDNN attention) with the trainer's packed batches (segment-masked attention)
#      HF LlamaForCausalLM eager (bf16 autocast) and + torch.compile   (own process: JAX does not preallocate there)
#      ours with plain-causal batches (cuDNN's fused causal kernel: what the library could use for unpacked rows)
# 3. decoding at the 7B shape (benchmarks/generate.py, ours vs HF generate, bf16, batch 1 and 16).
#
# Every part has its own timeout, cut further so the whole script ends within TOTAL_BUDGET_S; a part that fails or
# times out prints one clearly marked line and the script goes on. Needs only jax, flax, optax, numpy, torch and
# transformers (no ml_collections, grain or tensorflow_datasets); nothing is downloaded.
set -u
set -o pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2          # keep XLA's C++ info logs out of the table
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-470}  # leaves headroom under 8 minutes for interpreter start-up and the summary
LOG_DIR=${OUT:-/tmp}/gpu_bench_logs
mkdir -p "$LOG_DIR"

# The anchor training config, shared by every training part, and the decoding shape. Both can be replaced from the
# environment for a plumbing check on a machine without a GPU, e.g.
#   TRAIN_ARGS="--dim=64 --n_layers=2 --n_heads=4 --n_kv_heads=2 --ffn=128 --vocab=256 --seq=32 --steps=2 --warmup=1"
#   DECODE_ARGS="--shape=15m --n_layers=1 --batch=1 --new_tokens=8 --repeats=1" BATCH=2 ATTENTION=xla \
#   bash benchmarks/gpu.sh
# DECODE_ARGS may add --xla_option=NAME=VALUE (repeatable) to time ours with extra XLA options in the same run, e.g.
#   DECODE_ARGS="--shape=7b --batch=1,16 --dtype=bfloat16 --prompt_len=128 --new_tokens=256 --repeats=2 \
#     --xla_option=xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
read -r -a ANCHOR <<< "${TRAIN_ARGS:---dim=2048 --n_layers=22 --n_heads=32 --n_kv_heads=4 --ffn=5632 --vocab=32000 --seq=2048 --dtype=bfloat16 --steps=10 --warmup=2}"
read -r -a DECODE <<< "${DECODE_ARGS:---shape=7b --batch=1,16 --dtype=bfloat16 --prompt_len=128 --new_tokens=256 --repeats=2}"
BATCH=${BATCH:-8}
ATTENTION=${ATTENTION:-cudnn}  # xla for a CPU plumbing check

RESULTS=()

# run_part NAME TIMEOUT_S ENV_ASSIGNMENTS -- CMD...
#   Runs CMD with a timeout (capped by what is left of the budget), keeps the lines that start with "device=" (the
#   benchmarks' result lines); a training part that ran out of GPU memory is retried once with --batch=4 (the
#   last --batch wins). Every call passes at least one ENV assignment.
run_part() {
  local name=$1 limit=$2; shift 2
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  local left=$((TOTAL_BUDGET_S - SECONDS))
  if (( left < 30 )); then
    RESULTS+=("SKIPPED $name: the ${TOTAL_BUDGET_S}s budget is spent")
    return
  fi
  (( limit > left )) && limit=$left
  local log="$LOG_DIR/${name}.log"
  echo "--- $name (timeout ${limit}s) $*" >&2
  env "${envs[@]}" timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log" >&2
  local rc=${PIPESTATUS[0]}
  if [[ $name == train_* ]] && grep -qiE "out of memory|RESOURCE_EXHAUSTED|OutOfMemoryError" "$log"; then
    left=$((TOTAL_BUDGET_S - SECONDS))
    if (( left >= 30 )); then
      (( limit > left )) && limit=$left
      echo "--- $name: out of memory at --batch=$BATCH, retrying with --batch=4 (timeout ${limit}s)" >&2
      env "${envs[@]}" timeout --kill-after=10 "$limit" "$@" --batch=4 2>&1 | tee "$log" >&2
      rc=${PIPESTATUS[0]}
    fi
  fi
  local lines
  lines=$(grep -E "^(device=|[0-9a-z]+ fsdp=)" "$log" || true)
  if [[ -n $lines ]]; then
    while IFS= read -r line; do RESULTS+=("$line"); done <<< "$lines"
  fi
  if [[ -z $lines ]] && (( rc == 0 )); then
    RESULTS+=("NO RESULT $name: exited 0 without a result line (log: $log)")
  elif (( rc == 124 || rc == 137 )); then
    RESULTS+=("TIMEOUT $name after ${limit}s (log: $log)")
  elif (( rc != 0 )); then
    RESULTS+=("FAILED $name (exit $rc): $(grep -E "Error|error" "$log" | tail -1 | cut -c1-240) (log: $log)")
  fi
}

# 1. Device line.
echo "=== device" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /' >&2
DEVICE_LINE=$(timeout 120 "$PYTHON" - <<'EOF' 2>&1 | tail -1
import os
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
import platform, jax, flax, optax, numpy
try:
    import torch, transformers
    tv = f"torch {torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()}) transformers {transformers.__version__}"
except Exception as e:  # noqa: BLE001
    tv = f"torch/transformers unavailable: {e}"
d = jax.devices()[0]
print(f"device: {d.device_kind} x{jax.device_count()} ({d.platform}) | python {platform.python_version()} jax {jax.__version__} "
      f"flax {flax.__version__} optax {optax.__version__} numpy {numpy.__version__} | {tv}")
EOF
)
RESULTS+=("${DEVICE_LINE:-device: unknown (python/jax failed to start)}")

# 2. Training step.
run_part train_ours_packed 150 XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 -- \
  "$PYTHON" benchmarks/train_step.py "${ANCHOR[@]}" --attention="$ATTENTION" --segments=packed --batch="$BATCH"
run_part train_hf 240 XLA_PYTHON_CLIENT_PREALLOCATE=false -- \
  "$PYTHON" benchmarks/train_step.py "${ANCHOR[@]}" --no_ours --compare=hf --hf_variants=eager_bf16,compile_bf16 \
  --batch="$BATCH"
run_part train_ours_causal 120 XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 -- \
  "$PYTHON" benchmarks/train_step.py "${ANCHOR[@]}" --attention="$ATTENTION" --segments=none --batch="$BATCH"

# 3. Decoding, 7B shape (benchmarks/generate.py; ours and HF share the GPU in one process: JAX gets 45 %).
if [[ -f benchmarks/generate.py ]]; then
  run_part decode_7b 180 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 -- \
    "$PYTHON" benchmarks/generate.py "${DECODE[@]}"
else
  RESULTS+=("DECODE NOT RUN: benchmarks/generate.py is missing (fill in its 7B GPU command here)")
fi

echo
echo "=== GPU table ($(date -u +%Y-%m-%dT%H:%MZ), ${SECONDS}s; logs in $LOG_DIR)"
printf '%s\n' "${RESULTS[@]}"
