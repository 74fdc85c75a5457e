"""The serving engine: continuous batching over decode slots (llama2_jax.inference.decode's prefill / insert / generate_step,
the design of JetStream), run by one background thread that owns the device state.

Requests come in through a bounded queue (`Engine.submit`; full -> `QueueFull`). Between two decode steps the thread
prefills waiting requests (prompt widths padded to a few buckets, so a bounded number of programs is compiled, all
in `Engine.warm_up`) and inserts them into free slots; every slot then stops on its own EOS, stop string or
max_tokens, so a long request never holds up short ones. Each request's text is detokenized incrementally and handed
to its `emit` callback (called on the engine thread: the HTTP layer forwards it to its event loop).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from llama2_jax.inference import decode

MIN_BUCKET = 16
CONTEXT_TOKENS = 4  # prompt tokens decoded in front of a reply (see Engine._reply_text)


def prompt_buckets(max_len: int, smallest: int = MIN_BUCKET) -> list[int]:
    """Prefill widths: powers of two from `smallest`, then max_len itself (a prompt pads to the first that fits)."""
    widths, width = [], smallest
    while width < max_len:
        widths.append(width)
        width *= 2
    return widths + [max_len]


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    return next(width for width in buckets if width >= length)


class QueueFull(Exception):
    """The engine's request queue is full (HTTP 429)."""


@dataclasses.dataclass
class Request:
    """One completion. prompt: token ids (BOS included); temperature 0 = greedy; logprobs: how many top tokens per
    position to report (None: no log-probabilities); echo: report the prompt's tokens (and log-probabilities) too.
    emit(event) receives `Piece`s then one `Finished`, on the engine thread."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[object], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None
    echo: bool = False
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class Piece:
    text: str  # new completion text (stop strings and any text that may start one held back)


@dataclasses.dataclass
class Finished:
    text: str  # the whole completion text (before the first stop string; the stop string itself is not included)
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    tokens: list[int]  # the completion's token ids (echo: the prompt's first), up to the stop
    token_logprobs: Optional[list[Optional[float]]] = None  # per token (the first prompt token: None)
    top_logprobs: Optional[list[Optional[dict[int, float]]]] = None  # per token: {id: log-probability}
    error: Optional[str] = None  # set when the engine failed on this request


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` must wait: an incomplete UTF-8 character, or a prefix of a stop."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def cut_at_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """The index of the first stop string in text, or None."""
    found = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return min(found) if found else None


@dataclasses.dataclass
class _Active:
    request: Request
    prompt_logprobs: Optional[decode.SlotLogprobs] = None  # host copy, echo + logprobs only
    sent: str = ""


class Engine:
    """Continuous batching over `n_slots` decode slots of `max_len` tokens each (prompt + completion)."""
    def __init__(self, params, cfg, tokenizer, *, n_slots: int = 16, max_len: Optional[int] = None,
                 max_queue: int = 64):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.n_slots, self.max_len = n_slots, max_len or cfg.max_seq_len
        self.buckets = prompt_buckets(self.max_len)
        self.max_queue = max_queue
        self.pending: collections.deque[Request] = collections.deque()  # guarded by _queue_lock
        self._queue_lock = threading.Condition()
        self.slots: dict[int, _Active] = {}
        self.steps = 0
        self.cancelled = 0  # requests whose client went away while they were decoding
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.state = self._fresh_state()

    def _fresh_state(self) -> decode.DecodeState:
        return decode.init_slots(self.cfg, self.n_slots, self.max_len, jax.random.PRNGKey(0),
                                 eos_id=self.tokenizer.eos_id, logprobs=True)

    # -- compilation -------------------------------------------------------------------------------------------------

    def warm_up(self) -> int:
        """Compile every program the engine runs (prefill, prompt log-probabilities and insert per bucket, one step)
        before serving. Returns the number of buckets."""
        for width in self.buckets:
            self._insert(0, [self.tokenizer.bos_id], 1, 0.0, 1.0, 0, width=width, echo_logprobs=True)
        self.state = decode.generate_step_jit(self.params, self.cfg, self.state)
        jax.block_until_ready(self.state.tokens)
        self.state = self._fresh_state()
        return len(self.buckets)

    def _insert(self, slot, prompt, max_tokens, temperature, top_p, seed, *, width, echo_logprobs):
        tokens = np.full((width,), decode.META_PAD_ID, np.int32)
        tokens[: len(prompt)] = prompt
        prefix = decode.prefill_jit(self.params, self.cfg, tokens, np.int32(len(prompt)))
        lp = decode.prompt_logprobs_jit(self.params, self.cfg, tokens) if echo_logprobs else None
        self.state = decode.insert_jit(self.state, prefix, np.int32(slot), max_gen_len=np.int32(max_tokens),
                                       temperature=np.float32(temperature), top_p=np.float32(top_p),
                                       rng=jax.random.PRNGKey(seed))
        return None if lp is None else jax.device_get(lp)

    # -- the thread ------------------------------------------------------------------------------------------------

    def submit(self, *requests: Request) -> None:
        """Queue requests, all or none: QueueFull when they do not all fit in the queue now, ValueError when they
        could never fit (more than max_queue), RuntimeError once stopping."""
        with self._queue_lock:
            if self._stopping.is_set():
                raise RuntimeError("the server is shutting down")
            if len(requests) > self.max_queue:
                raise ValueError(f"{len(requests)} requests at once; the queue holds at most {self.max_queue}")
            if len(self.pending) + len(requests) > self.max_queue:
                raise QueueFull(f"the request queue is full ({len(self.pending)} of {self.max_queue} waiting)")
            self.pending.extend(requests)
            self._queue_lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llama2-jax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish the queued and in-flight requests, then end the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def load(self) -> dict[str, int]:
        return {"active": len(self.slots), "queued": len(self.pending), "slots": self.n_slots}

    def _run(self) -> None:
        while not (self._stopping.is_set() and not self.slots and not self.pending):
            self._admit()
            if not self.slots:
                with self._queue_lock:  # idle: wait for a request without spinning
                    if not self.pending:
                        self._queue_lock.wait(0.05)
                continue
            try:
                self.state = decode.generate_step_jit(self.params, self.cfg, self.state)
                self.steps += 1
                self._collect()
            except Exception as error:  # noqa: BLE001 -- fail the in-flight requests, keep serving
                self._fail_all(f"{type(error).__name__}: {error}")

    def _fail_all(self, message: str) -> None:
        """Answer every in-flight request with an error and start from fresh slots (the old state may be gone)."""
        for active in self.slots.values():
            request = active.request
            request.emit(Finished("", "error", len(request.prompt), 0, [], error=message))
        self.slots.clear()
        self.state = self._fresh_state()

    def _admit(self) -> None:
        while len(self.slots) < self.n_slots:
            with self._queue_lock:
                if not self.pending:
                    return
                request = self.pending.popleft()
            self._start(request)

    def _start(self, request: Request) -> None:
        if request.cancelled.is_set():
            return
        slot = min(set(range(self.n_slots)) - set(self.slots))
        try:
            lp = self._insert(slot, request.prompt, request.max_tokens, request.temperature, request.top_p,
                              request.seed, width=bucket_for(len(request.prompt), self.buckets),
                              echo_logprobs=request.echo and request.logprobs is not None)
        except Exception as error:  # noqa: BLE001 -- answer the request, keep serving
            request.emit(Finished("", "error", len(request.prompt), 0, [], error=str(error)))
            if self.state.tokens.is_deleted():  # insert had taken the donated state
                self._fail_all(f"{type(error).__name__}: {error}")
            return
        self.slots[slot] = _Active(request, lp)
        self._collect()

    def _collect(self) -> None:
        """Hand each slot's new text to its request; finish the slots that hit EOS, a stop string or max_tokens."""
        want_lp = any(a.request.logprobs is not None for a in self.slots.values())
        tokens, pos, end, done = jax.device_get((self.state.tokens, self.state.pos, self.state.end, self.state.done))
        lp = jax.device_get(self.state.logprobs) if want_lp else None
        for slot, active in list(self.slots.items()):
            request = active.request
            if request.cancelled.is_set():  # the client went away: free the slot
                del self.slots[slot]
                self.cancelled += 1
                continue
            start = len(request.prompt)
            reply = tokens[slot, start:pos[slot]].tolist()
            finished_eos = bool(done[slot])
            if finished_eos and self.tokenizer.eos_id in reply:
                reply = reply[: reply.index(self.tokenizer.eos_id)]
            text = self._reply_text(request.prompt, reply)
            cut = cut_at_stop(text, request.stop)
            finished = finished_eos or cut is not None or pos[slot] >= end[slot]
            if cut is not None:
                text = text[:cut]
            shown = text if finished else text[: len(text) - held_back(text, request.stop)]
            if len(shown) > len(active.sent):
                request.emit(Piece(shown[len(active.sent):]))
                active.sent = shown
            if finished:
                del self.slots[slot]
                reason = "stop" if finished_eos or cut is not None else "length"
                request.emit(self._finished(active, slot, reply, text, cut is not None, reason, lp))

    def _finished(self, active: _Active, slot: int, reply: list[int], text: str, was_cut: bool, reason: str, lp
                  ) -> Finished:
        request = active.request
        if was_cut:  # keep the tokens that the text before the stop needs
            kept = next(k for k in range(len(reply) + 1)
                        if len(self._reply_text(request.prompt, reply[:k])) >= len(text))
            reply = reply[:kept]
        out = Finished(text=text, finish_reason=reason, prompt_tokens=len(request.prompt),
                       completion_tokens=len(reply), tokens=list(reply))
        if request.logprobs is None:
            return out
        start, n = len(request.prompt), len(reply)
        positions = list(range(start, start + n))
        chosen = [float(lp.chosen[slot, p]) for p in positions]
        top = [self._top(lp.top_ids[slot, p], lp.top_values[slot, p], request.logprobs) for p in positions]
        if request.echo:
            prompt_lp = active.prompt_logprobs
            chosen = [None] + [float(prompt_lp.chosen[0, p]) for p in range(1, start)] + chosen
            top = [None] + [self._top(prompt_lp.top_ids[0, p], prompt_lp.top_values[0, p], request.logprobs)
                            for p in range(1, start)] + top
            out.tokens = list(request.prompt) + out.tokens
        out.token_logprobs, out.top_logprobs = chosen, top
        return out

    def _reply_text(self, prompt: list[int], reply: list[int]) -> str:
        """The reply's text as it continues the prompt: SentencePiece drops the leading space of a text's first
        piece, so decode it after the prompt's last tokens and cut their text off (prompt + reply text then equals
        the decoded whole)."""
        context = prompt[-CONTEXT_TOKENS:]
        before, whole = self.tokenizer.decode(context), self.tokenizer.decode(context + reply)
        return whole[len(before):] if whole.startswith(before) else self.tokenizer.decode(reply)

    @staticmethod
    def _top(ids, values, k: int) -> dict[int, float]:
        return {int(i): float(v) for i, v in zip(ids[:k], values[:k])}
