"""Prometheus metrics of the server (`GET /metrics`), vLLM's names under the `nanovllm:` prefix.

Gauges are read from the engine when scraped (plain counters; the engine loop alone changes them); counters and
histograms are fed by the serving code as requests finish.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                         0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}
        scheduler = engine.scheduler
        block_manager = scheduler.block_manager

        def gauge(name: str, doc: str, fn) -> None:
            Gauge(name, doc, list(labels), registry=registry).labels(**labels).set_function(fn)

        gauge("nanovllm:num_requests_running", "Requests in the running batch.", lambda: len(scheduler.running))
        gauge("nanovllm:num_requests_waiting", "Requests waiting to be scheduled.", lambda: len(scheduler.waiting))
        gauge("nanovllm:kv_cache_blocks_used", "KV cache blocks held by requests.",
              lambda: block_manager.num_blocks - block_manager.num_free_blocks)
        gauge("nanovllm:kv_cache_blocks_total", "KV cache blocks in all.", lambda: block_manager.num_blocks)
        gauge("nanovllm:num_preemptions", "Preemptions since start.", lambda: scheduler.num_preemptions)
        gauge("nanovllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache since start.",
              lambda: block_manager.num_prefix_query_tokens)
        gauge("nanovllm:prefix_cache_hits", "Prompt tokens served by the prefix cache since start.",
              lambda: block_manager.num_prefix_hit_tokens)
        self.prompt_tokens = Counter("nanovllm:prompt_tokens", "Prompt tokens of finished requests.",
                                     list(labels), registry=registry).labels(**labels)
        self.generation_tokens = Counter("nanovllm:generation_tokens", "Generated tokens of finished requests.",
                                         list(labels), registry=registry).labels(**labels)
        self.request_success = Counter("nanovllm:request_success", "Finished requests by finish reason.",
                                       [*labels, "finished_reason"], registry=registry)
        self.ttft = Histogram("nanovllm:time_to_first_token_seconds", "Time from arrival to the first token.",
                              list(labels), buckets=LATENCY_BUCKETS, registry=registry).labels(**labels)
        self.tpot = Histogram("nanovllm:time_per_output_token_seconds", "Time per output token after the first.",
                              list(labels), buckets=TOKEN_LATENCY_BUCKETS, registry=registry).labels(**labels)
        self.e2e = Histogram("nanovllm:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             list(labels), buckets=LATENCY_BUCKETS, registry=registry).labels(**labels)
        self.labels = labels

    def record(self, arrival: float, first_token_time: float | None, num_prompt_tokens: int,
               num_output_tokens: int, finish_reason: str | None) -> None:
        """One finished request (times from time.monotonic())."""
        end = time.monotonic()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        self.request_success.labels(**self.labels, finished_reason=finish_reason or "unknown").inc()
        self.e2e.observe(end - arrival)
        if first_token_time is not None:
            self.ttft.observe(max(0.0, first_token_time - arrival))
            if num_output_tokens > 1:
                self.tpot.observe((end - first_token_time) / (num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
