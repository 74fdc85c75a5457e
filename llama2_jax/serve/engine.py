"""The serving engine: continuous batching over decode slots (llama2_jax.inference.decode's slots and the programs
of serve.programs, the design of JetStream), run by one background thread that owns the device state.

Requests come in through a bounded queue (`Engine.submit`, all of a request's prompts or none; full -> `QueueFull`).
Between two decode steps the thread puts waiting requests into free slots: the prompt's cached prefix blocks are
copied in (serve.prefix_cache), the rest is prefilled (widths padded to a few buckets, so a bounded number of programs
is compiled, all in `Engine.warm_up`), and the other samples of an n > 1 request are copies of that slot. Every slot
then stops on its own EOS, stop string or max_tokens, so a long request never holds up short ones. Each completion's
text is detokenized incrementally and handed to its request's `emit` callback (called on the engine thread: the HTTP
layer forwards it to its event loop).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from llama2_jax.inference import decode, slots
from llama2_jax.model import sharding as sh
from llama2_jax.serve import programs
from llama2_jax.serve.metrics import Metrics
from llama2_jax.serve.prefix_cache import PrefixCache
from llama2_jax.serve.quantize import quantize_params
from llama2_jax.serve.text import cut_at_stop, held_back, reply_text, tokens_covering, tokens_for_text

SHUTDOWN_ERROR = "the server shut down before this completion finished (its grace period ran out)"
N_TOP = 20  # the most likely tokens recorded per position (OpenAI's chat top_logprobs allow up to 20)



def check_mesh(cfg, n_slots: int, mesh: Mesh) -> None:
    """ValueError (naming the flag) unless the slots split over the mesh's data axes and the KV heads over tensor."""
    data, tensor = sh.data_parallel_size(mesh), mesh.shape[sh.TENSOR]
    if n_slots % data:
        raise ValueError(f"--max_batch {n_slots} is not divisible by the mesh's data x fsdp size {data}")
    if cfg.n_kv_heads % tensor:
        raise ValueError(f"the model's {cfg.n_kv_heads} KV heads are not divisible by --mesh.tensor={tensor}")


def kv_bytes_per_token(cfg) -> int:
    """Bytes of KV cache one token takes (keys and values of every layer in the compute dtype)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize


def prefix_pool_blocks(cfg, megabytes: float, block: int) -> int:
    """How many prefix-cache blocks of `block` tokens fit in `megabytes` MiB."""
    return int(megabytes * 2 ** 20 // (kv_bytes_per_token(cfg) * block))


class QueueFull(Exception):
    """The engine's request queue is full (HTTP 429)."""


@dataclasses.dataclass
class Request:
    """One prompt's completions. prompt: token ids (BOS included); temperature 0 = greedy; n: samples of this prompt
    (sample i draws with fold_in(PRNGKey(seed), i), sample 0 with PRNGKey(seed)); logprobs: how many top tokens per
    position to report (None: no log-probabilities); echo: report the prompt (and its log-probabilities) first;
    frequency_penalty, presence_penalty, logit_bias ({token id: bias}): OpenAI's (serve.programs.logit_adjust).
    emit(event) receives `Piece`s then one `Finished` per sample, on the engine thread."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[object], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None
    echo: bool = False
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    queued_at: float = 0.0  # time.monotonic() when submitted


@dataclasses.dataclass
class TokenLogprob:
    token: int
    logprob: Optional[float]  # None for a prompt's first token (nothing predicts it)
    top: dict[int, float]  # the most likely tokens at this position, most likely first


@dataclasses.dataclass
class Piece:
    text: str  # new completion text (stop strings and any text that may start one held back)
    sample: int = 0
    logprobs: Optional[list[TokenLogprob]] = None  # the tokens this text completes (when log-probabilities asked)
    echo: bool = False  # the prompt (echo=True requests: sent first, text "", its tokens' log-probabilities)


@dataclasses.dataclass
class Finished:
    text: str  # the whole completion text (before the first stop string; the stop string itself is not included)
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    tokens: list[int]  # the completion's token ids, up to the stop
    sample: int = 0
    logprobs: Optional[list[TokenLogprob]] = None  # per completion token
    prompt_logprobs: Optional[list[TokenLogprob]] = None  # per prompt token (echo with logprobs)
    error: Optional[str] = None  # set when the engine failed on this request


@dataclasses.dataclass
class _Active:
    request: Request
    sample: int
    pos: int  # the slot's pos when last read (the next token lands there)
    last_token_at: float
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far (EOS included)
    entries: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: Optional[list[TokenLogprob]] = None
    sent: str = ""
    sent_entries: int = 0


class Engine:
    """Continuous batching over `n_slots` decode slots of `max_len` tokens each (prompt + completion).
    prefix_blocks > 0: a prefix cache of that many blocks of `prefix_block` tokens (see serve.prefix_cache);
    quantize="int8": int8 weight-only matmul kernels (see serve.quantize); mesh: serve one model sharded over it
    (see serve.programs; n_slots must divide by its data-parallel size, the KV heads by its tensor size)."""

    def __init__(self, params, cfg, tokenizer, *, n_slots: int = 16, max_len: Optional[int] = None,
                 max_queue: int = 64, prefix_blocks: int = 0, prefix_block: int = 16, quantize: Optional[str] = None,
                 mesh: Optional[Mesh] = None, metrics: Optional[Metrics] = None):
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if quantize or mesh is not None:
            params = decode.layer_params(params, cfg)
        if quantize:
            params = quantize_params(params)
        if mesh is not None:
            check_mesh(cfg, n_slots, mesh)
            shardings = programs.param_shardings(params, cfg, mesh)
            sh.check_divisible(params, shardings)
            params = jax.device_put(params, shardings)
        self.mesh = mesh
        self.params, self.cfg, self.tokenizer, self.quantize = params, cfg, tokenizer, quantize
        self.n_slots, self.max_len = n_slots, max_len or cfg.max_seq_len
        self.buckets = slots.prefill_widths(self.max_len)
        self.max_queue = max_queue  # samples waiting (a request of p prompts and n samples takes p * n)
        self.pending: collections.deque[tuple[Request, list[int]]] = collections.deque()  # guarded by _queue_lock
        self._queued = 0
        self._queue_lock = threading.Condition()
        self.slots: dict[int, _Active] = {}
        self.steps = self.prefills = 0
        self.cancelled = 0  # completions whose client went away while they were decoding
        self.metrics = metrics or Metrics()
        self.prefix = PrefixCache(prefix_blocks, prefix_block) if prefix_blocks else None
        self._stopping, self._abort = threading.Event(), threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._reset()

    def _reset(self) -> None:
        """Fresh slots (and an empty prefix cache): at start, and after a failure that may have taken the state."""
        self.state = slots.init_slots(self.cfg, self.n_slots, self.max_len, jax.random.PRNGKey(0),
                                       eos_id=self.tokenizer.eos_id, logprobs=True, n_top=N_TOP)
        self.controls = programs.init_controls(self.n_slots, self.cfg.vocab_size)
        if self.mesh is not None:
            self.state = jax.device_put(self.state, slots.slot_state_shardings(self.state, self.mesh))
            self.controls = jax.device_put(self.controls, sh.replicated(self.mesh))
        if self.prefix is not None:
            self.prefix.clear()
            self.pool = programs.init_pool(self.cfg, self.prefix.n_blocks, self.prefix.block)
            if self.mesh is not None:
                self.pool = jax.device_put(self.pool, programs.pool_shardings(self.pool, self.mesh))

    # -- compilation -------------------------------------------------------------------------------------------------

    def warm_up(self) -> int:
        """Compile every program the engine runs (prefill and prompt log-probabilities per bucket, fork, step, the
        prefix cache's copies) before serving. Returns the number of buckets."""
        for width in self.buckets:
            self._prefill(0, Request([self.tokenizer.bos_id], 1, lambda _: None), jax.random.PRNGKey(0), width)
            self._prompt_logprobs([self.tokenizer.bos_id], width)
        self.state, self.controls = programs.fork_slot_jit(self.state, self.controls, np.int32(0), np.int32(0),
                                                           jax.random.PRNGKey(0), mesh=self.mesh)
        self.state, self.controls = programs.step_jit(self.params, self.cfg, self.state, self.controls,
                                                      mesh=self.mesh)
        jax.block_until_ready(programs.latest_jit(self.state))
        if self.prefix is not None:
            ids = np.zeros(self.max_len // self.prefix.block, np.int32)
            self.state = programs.load_blocks_jit(self.state, self.pool, np.int32(0), ids, np.int32(0),
                                                  mesh=self.mesh)
            self.pool = programs.save_blocks_jit(self.pool, self.state, np.int32(0), ids, np.int32(0), np.int32(0),
                                                 mesh=self.mesh)
        jax.block_until_ready(self.state.tokens)
        self._reset()
        return len(self.buckets)

    # -- device work -----------------------------------------------------------------------------------------------

    def _prefill(self, slot: int, request: Request, rng, width: Optional[int] = None) -> None:
        """Put request's prompt into `slot`: its cached prefix blocks copied in, the rest prefilled, the new full
        blocks saved to the prefix cache. width: force the prefill bucket (warm_up)."""
        prompt, size = request.prompt, self.max_len
        keys, cached, start = [], [], 0
        if self.prefix is not None:
            keys = self.prefix.digests(prompt)
            cached = self.prefix.lookup(keys)
            if cached:
                self.state = programs.load_blocks_jit(self.state, self.pool, np.int32(slot), self._block_ids(cached),
                                                      np.int32(len(cached)), mesh=self.mesh)
            start = len(cached) * self.prefix.block
        width = width or slots.prefill_width(max(len(prompt) - 1 - start, 1), self.buckets)
        start = min(start, size - width)  # the prefill must fit in the slot (recomputing a little of the prefix)
        row = np.full((size,), decode.META_PAD_ID, np.int32)
        row[: len(prompt)] = prompt
        bias_ids = np.full((programs.MAX_LOGIT_BIAS,), self.cfg.vocab_size, np.int32)
        bias_values = np.zeros((programs.MAX_LOGIT_BIAS,), np.float32)
        bias_ids[: len(request.logit_bias)] = list(request.logit_bias)
        bias_values[: len(request.logit_bias)] = list(request.logit_bias.values())
        self.state, self.controls = programs.prefill_slot_jit(
            self.params, self.cfg, self.state, self.controls, np.int32(slot), row, np.int32(len(prompt)),
            np.int32(start), row[start:start + width], max_tokens=np.int32(request.max_tokens),
            temperature=np.float32(request.temperature), top_p=np.float32(request.top_p), rng=rng,
            frequency=np.float32(request.frequency_penalty), presence=np.float32(request.presence_penalty),
            bias_ids=bias_ids, bias_values=bias_values, mesh=self.mesh)
        if self.prefix is not None and len(keys) > len(cached):
            new = self.prefix.allocate(keys[len(cached):], keep=len(cached))
            if new:
                self.pool = programs.save_blocks_jit(self.pool, self.state, np.int32(slot),
                                                     self._block_ids(cached + new), np.int32(len(cached)),
                                                     np.int32(len(cached) + len(new)), mesh=self.mesh)

    def _block_ids(self, blocks: list[int]) -> np.ndarray:
        ids = np.zeros((self.max_len // self.prefix.block,), np.int32)
        ids[: len(blocks)] = blocks
        return ids

    def _prompt_logprobs(self, prompt: list[int], width: int) -> list[TokenLogprob]:
        """The prompt's tokens with their log-probabilities (echo with logprobs): position 0 has none."""
        tokens = np.full((width,), decode.META_PAD_ID, np.int32)
        tokens[: len(prompt)] = prompt
        lp = jax.device_get(programs.prompt_logprobs_jit(self.params, self.cfg, tokens))
        return [TokenLogprob(prompt[0], None, {})] + [
            TokenLogprob(prompt[p], float(lp.chosen[0, p]), _top(lp.top_ids[0, p], lp.top_values[0, p]))
            for p in range(1, len(prompt))]

    # -- the queue and the thread ----------------------------------------------------------------------------------

    def submit(self, *requests: Request) -> None:
        """Queue requests, all or none: QueueFull when their samples do not all fit in the queue now, ValueError
        when they never could (more than max_queue), RuntimeError once stopping."""
        samples = sum(r.n for r in requests)
        with self._queue_lock:
            if self._stopping.is_set():
                raise RuntimeError("the server is shutting down")
            if samples > self.max_queue:
                raise ValueError(f"{samples} completions at once; the queue holds at most {self.max_queue}")
            if self._queued + samples > self.max_queue:
                raise QueueFull(f"the request queue is full ({self._queued} of {self.max_queue} waiting)")
            now = time.monotonic()
            for request in requests:
                request.queued_at = now
                self.pending.append((request, list(range(request.n))))
            self._queued += samples
            self._queue_lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llama2-jax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish the queued and in-flight requests, then end the thread; after `timeout` seconds the requests still
        queued or in flight are answered with an error instead (a shutdown's grace period)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abort.set()
                self._thread.join()

    def memory_line(self) -> str:
        """Device memory of the weights, the slots' KV cache and the prefix cache, for the start-up line."""
        mib = lambda n: f"{n / 2 ** 20:.1f} MiB"
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.params))
        kv = kv_bytes_per_token(self.cfg)
        line = (f"weights {mib(weights)}{' (int8 kernels)' if self.quantize else ''}, "
                f"KV cache {mib(kv * self.n_slots * self.max_len)}")
        if self.prefix is not None:
            line += (f", prefix cache {mib(kv * self.prefix.n_blocks * self.prefix.block)} ({self.prefix.n_blocks} "
                     f"blocks of {self.prefix.block} tokens)")
        return line

    def load(self) -> dict[str, int]:
        return {"active": len(self.slots), "queued": self._queued, "slots": self.n_slots}

    def _run(self) -> None:
        while not (self._stopping.is_set() and not self.slots and not self.pending):
            if self._abort.is_set():
                self._fail_all(SHUTDOWN_ERROR)
                with self._queue_lock:
                    for request, samples in self.pending:
                        for sample in samples:
                            request.emit(Finished("", "error", len(request.prompt), 0, [], sample,
                                                  error=SHUTDOWN_ERROR))
                    self.pending.clear()
                    self._queued = 0
                return
            self._admit()
            if not self.slots:
                with self._queue_lock:  # idle: wait for a request without spinning
                    if not self.pending:
                        self._queue_lock.wait(0.05)
                continue
            try:
                self.state, self.controls = programs.step_jit(self.params, self.cfg, self.state, self.controls,
                                                              mesh=self.mesh)
                self.steps += 1
                self._collect()
            except Exception as error:  # noqa: BLE001 -- fail the in-flight requests, keep serving
                self._fail_all(f"{type(error).__name__}: {error}")

    def _fail_all(self, message: str) -> None:
        """Answer every in-flight request with an error and start from fresh slots (the old state may be gone)."""
        for active in self.slots.values():
            request = active.request
            request.emit(Finished("", "error", len(request.prompt), 0, [], active.sample, error=message))
        self.slots.clear()
        self._reset()

    def _admit(self) -> None:
        """Start waiting samples in free slots, oldest request first (a request's samples that find no slot wait at
        the front of the queue)."""
        while len(self.slots) < self.n_slots:
            with self._queue_lock:
                if not self.pending:
                    return
                request, samples = self.pending.popleft()
                free = self.n_slots - len(self.slots)
                if len(samples) > free:
                    self.pending.appendleft((request, samples[free:]))
                    samples = samples[:free]
                self._queued -= len(samples)
            self._start(request, samples)

    def _start(self, request: Request, samples: list[int]) -> None:
        if request.cancelled.is_set():
            return
        free = sorted(set(range(self.n_slots)) - set(self.slots))[: len(samples)]
        keys = [_sample_key(request.seed, sample) for sample in samples]
        try:
            self._prefill(free[0], request, keys[0])
            self.prefills += 1
            for slot, key in zip(free[1:], keys[1:]):
                self.state, self.controls = programs.fork_slot_jit(self.state, self.controls, np.int32(free[0]),
                                                                   np.int32(slot), key, mesh=self.mesh)
            echo_lp = None
            if request.echo and request.logprobs is not None:
                echo_lp = [_cut_top(entry, request.logprobs) for entry in self._prompt_logprobs(
                    request.prompt, slots.prefill_width(len(request.prompt), self.buckets))]
        except Exception as error:  # noqa: BLE001 -- answer the request, keep serving
            for sample in samples:
                request.emit(Finished("", "error", len(request.prompt), 0, [], sample, error=str(error)))
            if self.state.tokens.is_deleted() or self.controls.counts.is_deleted():  # a program took the state
                self._fail_all(f"{type(error).__name__}: {error}")
            return
        now = time.monotonic()
        for slot, sample in zip(free, samples):
            self.slots[slot] = _Active(request, sample, len(request.prompt), now, prompt_logprobs=echo_lp)
            if request.echo:
                request.emit(Piece("", sample, echo_lp, echo=True))

    def _collect(self) -> None:
        """Read each slot's new token; hand each request its new text; finish the slots that hit EOS, a stop string
        or max_tokens."""
        latest = jax.device_get(programs.latest_jit(self.state))
        now = time.monotonic()
        for slot, active in list(self.slots.items()):
            request = active.request
            if request.cancelled.is_set():  # the client went away: free the slot
                del self.slots[slot]
                self.cancelled += 1
                self.metrics.cancel()
                continue
            pos = int(latest["pos"][slot])
            if pos > active.pos:  # one new token, at pos - 1
                active.pos = pos
                token = int(latest["token"][slot])
                active.tokens.append(token)
                if request.logprobs is not None:
                    active.entries.append(TokenLogprob(token, float(latest["chosen"][slot]), _top(
                        latest["top_ids"][slot], latest["top_values"][slot], request.logprobs)))
                (self.metrics.next_token if len(active.tokens) > 1 else self.metrics.first_token)(
                    now - (active.last_token_at if len(active.tokens) > 1 else request.queued_at))
                active.last_token_at = now
            self._advance(slot, active, eos=bool(latest["done"][slot]),
                          at_end=pos >= min(self.max_len, len(request.prompt) + request.max_tokens))

    def _advance(self, slot: int, active: _Active, *, eos: bool, at_end: bool) -> None:
        request = active.request
        reply = active.tokens[:-1] if eos and active.tokens and active.tokens[-1] == self.tokenizer.eos_id \
            else active.tokens
        text = reply_text(self.tokenizer, request.prompt, reply)
        cut = cut_at_stop(text, request.stop)
        finished = eos or cut is not None or at_end
        if cut is not None:
            text = text[:cut]
            reply = reply[: tokens_for_text(self.tokenizer, request.prompt, reply, len(text))]
        shown = text if finished else text[: len(text) - held_back(text, request.stop)]
        entries = None
        if request.logprobs is not None:
            covered = len(reply) if finished else tokens_covering(self.tokenizer, request.prompt, reply, len(shown),
                                                                  active.sent_entries)
            entries = active.entries[active.sent_entries:covered]
            active.sent_entries = covered
        if len(shown) > len(active.sent) or entries:
            request.emit(Piece(shown[len(active.sent):], active.sample, entries))
            active.sent = shown
        if finished:
            del self.slots[slot]
            self.metrics.finished(len(request.prompt) if active.sample == 0 else 0, len(reply))
            request.emit(Finished(text=text, finish_reason="stop" if eos or cut is not None else "length",
                                  prompt_tokens=len(request.prompt), completion_tokens=len(reply), tokens=list(reply),
                                  sample=active.sample,
                                  logprobs=active.entries[: len(reply)] if request.logprobs is not None else None,
                                  prompt_logprobs=active.prompt_logprobs))


def _sample_key(seed: int, sample: int):
    key = jax.random.PRNGKey(seed)
    return key if sample == 0 else jax.random.fold_in(key, sample)


def _top(ids, values, k: int = N_TOP) -> dict[int, float]:
    return {int(i): float(v) for i, v in zip(ids[:k], values[:k])}


def _cut_top(entry: TokenLogprob, k: int) -> TokenLogprob:
    return TokenLogprob(entry.token, entry.logprob, dict(list(entry.top.items())[:k]))
