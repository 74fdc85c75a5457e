"""lm-evaluation-harness backend `llama2_jax`: our JAX model behind lm-eval's `TemplateLM` interface.

    lm_eval --model llama2_jax --model_args checkpoint=DIR,tokenizer=FILE[,dtype=float32,mesh=1:-1:1,max_length=N]
    (or `python -m llama2_jax.evaluate`, which registers this backend and adds the project's task YAMLs)

Tokenization follows lm-eval's `hf` backend on a Llama tokenizer, so the numbers are comparable:
  * `tok_encode(s)` = BOS + SentencePiece(s) (HF's Llama tokenizers add BOS by default); no BOS when asked, or when
    the string already starts with "<s>". Literal "<s>" / "</s>" split the text and become BOS / EOS ids, as HF's
    added special tokens do (so chat-templated strings encode as `chat.encode_dialog`).
  * loglikelihood: TemplateLM's split (trailing context spaces move to the continuation; the continuation is
    encode(context + continuation)[len(encode(context)):]); an empty context is conditioned on BOS.
  * loglikelihood_rolling: lm-eval's disjoint rolling windows over tok_encode(text) (BOS included, as `hf` does)
    with BOS as the prefix token and max_seq_len as the window.
  * max_length (lm-eval's `hf` model_arg of the same name) replaces the checkpoint's max_seq_len as the window: RoPE
    positions are computed, not tabled, so a model can be scored past the length it was trained at.
  * A continuation longer than the window is refused: the `hf` backend left-truncates context + continuation to
    max_length + 1 tokens, which keeps its numbers defined only while the continuation fits (past that it slices
    logits[inplen - contlen:inplen] with a negative start and scores the wrong positions).
  * generate_until: contexts left-truncated to max_seq_len - max_gen_toks, the compiled sampler
    (`generate.generate`, greedy unless do_sample/temperature ask otherwise), then cut at the first stop sequence
    (EOS is always one) exactly as lm-eval's `postprocess_generated_text`.
The numerics are in `lm_scoring` (bucketed, sharded, one compilation per width).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import jax
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llama2_jax.inference import generate
from llama2_jax.inference import scoring as lm_scoring
from llama2_jax.model import sharding as sh
from llama2_jax.model.config import LlamaConfig
from llama2_jax.text import chat_format as chat
from llama2_jax.text.tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default (HFLM.max_gen_toks)
BOS_STR, EOS_STR = "<s>", "</s>"
DTYPES = ("float32", "bfloat16")
CHAT_TEMPLATE_NAME = "llama-2-chat (Meta's [INST] format, chat.encode_dialog)"


def default_dtype() -> str:
    """float32 on CPU (exact, and XLA:CPU has no fast bfloat16 matmuls), else bfloat16, as the other model CLIs."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def parse_mesh(spec: Optional[str]):
    """None / "none" -> no mesh; "D:F:T" -> sharding.make_mesh(D, F, T) (-1 = the remaining devices)."""
    if spec is None or str(spec).lower() == "none":
        return None
    try:
        data, fsdp, tensor = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise ValueError(f"mesh={spec!r}: expected data:fsdp:tensor, e.g. 1:-1:1") from None
    return sh.make_mesh(data, fsdp, tensor)


def parse_max_length(value: Optional[int | str], default: int) -> int:
    """model_arg max_length: None -> the checkpoint's max_seq_len; else a positive int."""
    if value is None or str(value).lower() == "none":
        return default
    try:
        length = int(value)
    except ValueError:
        length = 0
    if length < 1:
        raise ValueError(f"max_length={value!r}: expected a positive number of tokens")
    return length


@register_model("llama2_jax")
class LlamaJaxLM(TemplateLM):
    """lm-eval LM over in-memory params (`from_params`) or a checkpoint (`checkpoint=`, `tokenizer=` model_args)."""
    backend = "causal"

    def __init__(self, checkpoint: Optional[str] = None, tokenizer: Optional[str] = None, dtype: Optional[str] = None,
                 batch_size: int | str = 16, mesh: Optional[str] = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 max_length: Optional[int | str] = None, device: Any = None, max_batch_size: Any = None, trust_remote_code: Any = None, **unknown: Any):
        """model_args. device / max_batch_size / trust_remote_code are lm-eval's and unused (jax places the arrays);
        batch_size="auto" means 16 (no search)."""
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args for llama2_jax: {', '.join(sorted(unknown))}")
        if checkpoint is None or tokenizer is None:
            raise ValueError("model_args need checkpoint=DIR and tokenizer=FILE")
        from llama2_jax.checkpoints.params_io import load_params

        params, cfg = load_params(checkpoint)
        self._setup(params, cfg, Tokenizer(tokenizer), dtype=dtype, batch_size=batch_size, mesh=parse_mesh(mesh),
                    max_gen_toks=max_gen_toks, max_length=max_length)

    @classmethod
    def from_params(cls, params, cfg: LlamaConfig, tokenizer: Tokenizer, *, dtype: Optional[str] = None,
                    batch_size: int = 16, mesh=None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                    max_length: Optional[int] = None) -> "LlamaJaxLM":
        """An LM over params already in memory (a training loop's), without reading a checkpoint."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(params, cfg, tokenizer, dtype=dtype, batch_size=batch_size, mesh=mesh, max_gen_toks=max_gen_toks,
                  max_length=max_length)
        return lm

    def _setup(self, params, cfg: LlamaConfig, tokenizer: Tokenizer, *, dtype, batch_size, mesh, max_gen_toks,
               max_length=None):
        dtype = dtype or default_dtype()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
        if tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces but the model's "
                             f"vocab_size is {cfg.vocab_size}")
        self.cfg = cfg.replace(dtype=dtype, max_seq_len=parse_max_length(max_length, cfg.max_seq_len))
        self.sp = tokenizer
        self.mesh = mesh
        self.params = lm_scoring.shard_params(params, self.cfg, mesh)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------------------------------ tokenization

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.sp.bos_id

    @property
    def max_length(self) -> int:
        return self.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.sp.model_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """SentencePiece ids of `string`, "<s>"/"</s>" as BOS/EOS ids, BOS in front unless the string starts with
        "<s>" or add_special_tokens is False (see the module docstring)."""
        ids: list[int] = []
        for part in re.split(f"({re.escape(BOS_STR)}|{re.escape(EOS_STR)})", string):
            if part == BOS_STR:
                ids.append(self.sp.bos_id)
            elif part == EOS_STR:
                ids.append(self.sp.eos_id)
            elif part:
                ids += self.sp.encode(part)
        add_bos = add_special_tokens if add_special_tokens is not None else not string.startswith(BOS_STR)
        return [self.sp.bos_id] + ids if add_bos else ids

    def tok_decode(self, tokens) -> str:
        return self.sp.decode(tokens)

    # ------------------------------------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = lm_scoring.continuation_logprobs(self.params, self.cfg, pairs, batch_size=self.batch_size,
                                                   mesh=self.mesh)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for window in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None,) + window)
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one sampler setting per group, as lm-eval's hf backend
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            for i, text in zip(indices, self._generate_group(contexts, requests[indices[0]].args[1])):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=EOS_STR)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if max_gen_toks >= self.max_length:
            raise ValueError(f"max_gen_toks={max_gen_toks} must be less than max_seq_len {self.max_length}")
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        top_p = float(kwargs.get("top_p", 1.0))
        prompts = [self.tok_encode(c)[-(self.max_length - max_gen_toks):] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar widths share a batch
        texts = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            generations = generate.generate(
                self.params, self.cfg, [prompts[i] for i in chunk], max_gen_len=max_gen_toks,
                temperature=temperature, top_p=top_p, eos_id=self.eot_token_id, rng=int(kwargs.get("seed", 1)),
                mesh=self.mesh)
            for i, tokens in zip(chunk, generations):
                texts[i] = postprocess_generated_text(self.tok_decode(tokens), until, None)
        return texts

    # ------------------------------------------------------------------------------------------------ chat

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        return CHAT_TEMPLATE_NAME if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Meta's Llama 2 chat format as a string ("<s>"/"</s>" stand for BOS/EOS, see `tok_encode`):
        "<s>[INST] u1 [/INST] a1 </s><s>[INST] u2 [/INST]". With add_generation_prompt=False the history ends with
        a partial assistant message, which is continued: "... [/INST] partial"."""
        history = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        partial = None
        if not add_generation_prompt and history and history[-1]["role"] == "assistant":
            partial = history.pop()["content"]
        messages = chat.normalize_dialog(history, last_role="user")
        text = "".join(f"{BOS_STR}{chat.turn_pair_string(u['content'], a['content'])}{EOS_STR}"
                       for u, a in zip(messages[:-1:2], messages[1::2]))
        text += BOS_STR + chat.turn_prompt_string(messages[-1]["content"])
        return text if partial is None else f"{text} {partial.strip()}"
