"""What an operator watches, served at GET /metrics in Prometheus' text exposition format (version 0.0.4,
prometheus.io/docs/instrumenting/exposition_formats): counters, gauges and cumulative histograms, written in a few
lines here rather than with prometheus_client, which the server does not otherwise need."""

from __future__ import annotations

import bisect
import threading

PREFIX = "llama2_jax_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip(self.buckets, self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """The server's numbers; every method is thread-safe (the engine thread records, the HTTP loop reads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, HTTP status) -> count
        self.prompt_tokens = self.completion_tokens = self.cancelled = 0
        self.time_to_first_token = Histogram()
        self.time_per_output_token = Histogram()

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self._lock:
            self.time_per_output_token.observe(seconds)

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self, current: list[tuple[str, str, str, float]]) -> str:
        """The exposition text, with `current`: (name, kind, help, value) rows read now (queue depth, slots ...)."""
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", *samples])

        with self._lock:
            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status",
                   [f'{PREFIX}requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())])
            metric("prompt_tokens_total", "counter", "prompt tokens of finished completions",
                   [f"{PREFIX}prompt_tokens_total {self.prompt_tokens}"])
            metric("completion_tokens_total", "counter", "generated tokens of finished completions",
                   [f"{PREFIX}completion_tokens_total {self.completion_tokens}"])
            metric("cancelled_total", "counter", "completions whose client went away before they finished",
                   [f"{PREFIX}cancelled_total {self.cancelled}"])
            metric("time_to_first_token_seconds", "histogram", "from queueing a completion to its first token",
                   self.time_to_first_token.lines(f"{PREFIX}time_to_first_token_seconds"))
            metric("time_per_output_token_seconds", "histogram", "between two tokens of one completion",
                   self.time_per_output_token.lines(f"{PREFIX}time_per_output_token_seconds"))
        for name, kind, help_text, value in current:
            metric(name, kind, help_text, [f"{PREFIX}{name} {value}"])
        return "\n".join(lines) + "\n"
