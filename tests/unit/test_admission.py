"""Admission before work (`deployments.admission`) against a real batcher, and a best-of-N whose 1 MB prompt is
tokenized once (the encode calls counted)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from deployments.admission import AdmissionGate, RequestScope, parse_timeout, tenant_of
from deployments.batcher import TokenBatcher
from deployments.errors import DeadlineExceededError, InvalidRequestError, OverloadedError
from deployments.prompt import SteerLMPrompt
from deployments.schemas import Message


async def _rows(token_lists, extras):
    await asyncio.sleep(0.02)
    return np.zeros((len(token_lists), 2), dtype=np.float32)


def test_gate_refuses_past_its_bound_at_once_and_counts_releases():
    batcher = TokenBatcher(_rows, max_tokens_per_batch=100, max_batches_in_flight=1, max_queued_tokens=1000)
    gate = AdmissionGate(batcher, max_ongoing_requests=2, max_queued_tokens=1000, max_timeout_s=60)
    gate.admit()
    gate.admit()
    start = time.perf_counter()
    with pytest.raises(OverloadedError, match=r"holds 2 requests; the limit \(router.max_ongoing_requests\) is 2"):
        gate.admit()
    assert time.perf_counter() - start < 0.05 and gate.refused == 1
    gate.release()
    assert gate.admit().timeout_s is None and gate.ongoing == 2


def test_gate_refuses_when_the_queue_is_full_or_the_deadline_cannot_be_met():
    async def main():
        batcher = TokenBatcher(_rows, max_tokens_per_batch=100, max_batches_in_flight=1, max_queued_tokens=1000)
        gate = AdmissionGate(batcher, max_ongoing_requests=100, max_queued_tokens=300, max_timeout_s=60)
        await batcher.score([[1] * 100])  # a measured drain rate: ~100 tokens per 0.02 s
        tasks = [asyncio.ensure_future(batcher.score([[2 + i] * 100])) for i in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="queue is full") as info:
            gate.admit()
        assert info.value.retry_after_s >= 1
        await asyncio.gather(*tasks[:1])
        assert batcher.estimated_wait_s() > 0.001
        with pytest.raises(OverloadedError, match="deadline cannot be met"):
            gate.admit(timeout_s=0.001)
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_timeouts_are_checked_and_scopes_count_down():
    assert parse_timeout(None, "timeout_s", 60) is None
    assert parse_timeout("2.5", "X-Request-Timeout", 60) == 2.5
    for bad in (0, -1, "soon", float("nan"), True):
        with pytest.raises(InvalidRequestError, match="positive number of seconds") as info:
            parse_timeout(bad, "timeout_s", 60)
        assert info.value.param == "timeout_s"
    with pytest.raises(InvalidRequestError, match=r"timeout_s is 61 s; the limit \(router.max_timeout_s\) is 60"):
        parse_timeout(61, "timeout_s", 60)
    scope = RequestScope("t", time.perf_counter() - 1.0, 5.0)
    assert scope.with_timeout(9) is scope and scope.with_timeout(2).timeout_s == 2
    assert 3.9 < scope.remaining_s() <= 4.0
    with pytest.raises(DeadlineExceededError, match=r"deadline of 0.5 s \(timeout_s\) passed after it waited 1"):
        scope.with_timeout(0.5).remaining_s()
    assert tenant_of(None) is None and tenant_of("Bearer a") == tenant_of(" Bearer a ") != tenant_of("Bearer b")


def test_best_of_n_with_a_1mb_prompt_tokenizes_it_once(demo_tokenizer):
    """40 responses to a 1 MB prompt, truncated to the limit: SentencePiece reads the prompt's text once for its
    tokens and once for the piece offsets where the cut falls (every call into the processor is counted, not
    only `encode`); what else it reads is bounded by the token limit per response (the cut of the oldest kept
    turn is re-encoded), not by the prompt: about 2.5 MB in all here, where encoding each conversation whole
    read 40 MB and reading the offsets per response 41 MB."""
    prompt_format = SteerLMPrompt(demo_tokenizer)
    calls: list[int] = []
    processor = demo_tokenizer._sp

    class Counting:
        """The SentencePiece processor, with the size of every text it encodes recorded."""

        def encode(self, text: str, **kwargs):
            calls.append(len(text))
            return processor.encode(text, **kwargs)

        def __getattr__(self, name: str):
            return getattr(processor, name)

    demo_tokenizer._sp = Counting()
    try:
        prompt = [Message(role="user", content=("the quick brown fox jumps over the lazy dog " * 24000)[:1_000_000])]
        responses = [f"answer number {i}, short and plain." for i in range(40)]
        prompts = prompt_format.tokenize_best_of_n(prompt, responses, max_tokens=4096, truncate="left")
    finally:
        demo_tokenizer._sp = processor
    assert len(prompts) == 40 and all(p.truncated and p.num_tokens <= 4096 for p in prompts)
    assert sum(size >= 1_000_000 for size in calls) == 2, sorted(calls)[-3:]  # the tokens, the offsets
    assert sorted(calls)[-3] < 4 * 4096  # every other encode: a response's turn, or a cut within the limit
