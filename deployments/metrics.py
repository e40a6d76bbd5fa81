"""Prometheus metrics of the router (through `ray.serve.metrics`, exported per node with a `ray_` prefix).

* `reward_requests_total{route, status}`: every HTTP request by matched route template and status code.
* `reward_rejected_too_long_total{route}`: inputs refused for being over the token limit;
  `reward_truncated_inputs_total{route}`: inputs scored after dropping tokens (`truncate: left`, KServe).
* `reward_batch_tokens`: real (unpadded) tokens per model batch.
* `reward_batch_computed_tokens`: tokens the engine computes per model batch (after prefix sharing, with
  padding and prefixes repeated at micro-batch cuts).
* `reward_batch_padding_share`: share of the computed tokens that are padding, per model batch (0 with the
  forest layout).
* `reward_batch_shared_token_share`: share of the requested tokens not computed because a shared prefix
  was computed once, per model batch (0 with the padded layout).
* `reward_batch_latency_seconds`: wall time of one model call, seen from the router.
* `reward_batches_in_flight`: model batches sent and not yet answered.
* `reward_queue_seconds`: per request, from entering the batch queue to its first batch's model call.
* `reward_time_to_first_batch_seconds`: per request, from its admission (before its body is read) to its
  first batch's model call: reading, validating, tokenizing and queueing.
* `reward_engine_info{device}`: 1, with what computes the scores: `cpu`, `cuda`, or `simulated:<card>` (a
  simulated accelerator: no model computes, rewards are pseudo-random; its timings are a cost model's).

Computed tokens are counted here from the batch's token lists with the engine's own layout function
(`sharding.micro_batches.computed_tokens` for `parallel.batch_layout` and `max_tokens_per_micro_batch`), so
they are exact without the engine reporting them.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.serve.metrics import Counter, Gauge, Histogram

from configs.service import ParallelConfig
from sharding.micro_batches import computed_tokens

TOKEN_BOUNDARIES = [64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0]
SHARE_BOUNDARIES = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def batch_shares(token_lists: Sequence[Sequence[int]], parallel: ParallelConfig) -> tuple[int, float, float]:
    """(computed tokens, padding share of them, share of the requested tokens saved by prefix sharing)."""
    requested = sum(len(t) for t in token_lists)
    computed = computed_tokens(token_lists, parallel)
    padding = max(computed - requested, 0) / computed if computed else 0.0
    shared = max(requested - computed, 0) / requested if requested else 0.0
    return computed, padding, shared


class RouterMetrics:
    """The router's metric objects; create one per replica (inside Ray)."""

    def __init__(self, parallel: ParallelConfig, device: str | None = None):
        self._parallel = parallel
        if device is not None:
            info = Gauge("reward_engine_info", description="1, tagged with what computes the scores "
                         "(cpu, cuda, or simulated:<card>).", tag_keys=("device",))
            info.set(1, tags={"device": device})
        self._requests = Counter(
            "reward_requests", description="HTTP requests by route and status code.", tag_keys=("route", "status")
        )
        self._rejected_too_long = Counter(
            "reward_rejected_too_long", description="Inputs rejected for exceeding the token limit.",
            tag_keys=("route",),
        )
        self._truncated = Counter(
            "reward_truncated_inputs", description="Inputs scored after dropping tokens to fit the limit.",
            tag_keys=("route",),
        )
        self._batch_tokens = Histogram(
            "reward_batch_tokens", description="Real (unpadded) tokens per model batch.",
            boundaries=TOKEN_BOUNDARIES,
        )
        self._computed_tokens = Histogram(
            "reward_batch_computed_tokens", description="Tokens the engine computes per model batch.",
            boundaries=TOKEN_BOUNDARIES,
        )
        self._shared_share = Histogram(
            "reward_batch_shared_token_share",
            description="Share of the requested tokens per model batch not computed thanks to shared prefixes.",
            boundaries=SHARE_BOUNDARIES,
        )
        self._padding_share = Histogram(
            "reward_batch_padding_share", description="Padding share of the tokens computed per model batch.",
            boundaries=SHARE_BOUNDARIES,
        )
        self._batch_latency_s = Histogram(
            "reward_batch_latency_seconds", description="Model call wall time per batch, seen from the router.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self._in_flight = Gauge("reward_batches_in_flight", description="Model batches sent and not yet answered.")
        self._queue_s = Histogram(
            "reward_queue_seconds", description="Per request: from entering the batch queue to its first batch.",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self._first_batch_s = Histogram(
            "reward_time_to_first_batch_seconds",
            description="Per request: from admission to its first batch (reading, tokenizing, queueing).",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self._in_flight_count = 0
        self.totals = {"batches": 0, "requested_tokens": 0, "computed_tokens": 0}  # since start (benchmarks)

    def request(self, route: str, status: int) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})

    def rejected_too_long(self, route: str) -> None:
        self._rejected_too_long.inc(tags={"route": route})

    def truncated(self, route: str, count: int) -> None:
        if count:
            self._truncated.inc(count, tags={"route": route})

    def batch_started(self, token_lists: Sequence[Sequence[int]]) -> None:
        computed, padding, shared = batch_shares(token_lists, self._parallel)
        self.totals["batches"] += 1
        self.totals["requested_tokens"] += sum(len(t) for t in token_lists)
        self.totals["computed_tokens"] += computed
        self._batch_tokens.observe(float(sum(len(t) for t in token_lists)))
        self._computed_tokens.observe(float(computed))
        self._padding_share.observe(padding)
        self._shared_share.observe(shared)
        self._in_flight_count += 1
        self._in_flight.set(self._in_flight_count)

    def request_timed(self, queue_s: float, first_batch_s: float) -> None:
        """A request got its rows: its time in the batch queue and from admission to its first batch."""
        self._queue_s.observe(queue_s)
        self._first_batch_s.observe(first_batch_s)

    def batch_finished(self, latency_s: float) -> None:
        self._batch_latency_s.observe(latency_s)
        self._in_flight_count -= 1
        self._in_flight.set(self._in_flight_count)
