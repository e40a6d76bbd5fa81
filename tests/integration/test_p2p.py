"""Activation transfer between pipeline stages at TP2 x PP2 (gloo, fresh processes, no Ray): with and without
scatter-gather, every micro-batch arrives bit for bit, in order, with all receives posted up front."""

from __future__ import annotations

import pytest

from tests.gloo_world import run_world

SHAPES = [(7, 3, 8), (5, 1, 8), (11, 2, 8)]  # [seq, batch, hidden] per micro-batch, hidden divisible by TP


def _activation(index: int, shape: tuple[int, ...]):
    import torch

    generator = torch.Generator().manual_seed(index)
    return torch.randn(shape, generator=generator)


def _exchange(rank: int, scatter_gather: bool) -> list | None:
    import torch
    from megatron.core import parallel_state

    from sharding.p2p import ActivationReceiver, send_activation

    if parallel_state.is_pipeline_first_stage():
        sends = [send_activation(_activation(i, shape), scatter_gather) for i, shape in enumerate(SHAPES)]
        for _, request in sends:
            request.wait()
        return [int(tensor.numel()) for tensor, _ in sends]
    receiver = ActivationReceiver(SHAPES, torch.float32, torch.device("cpu"), scatter_gather)
    return [bool(torch.equal(receiver.next(), _activation(i, shape))) for i, shape in enumerate(SHAPES)]


@pytest.mark.parametrize("scatter_gather", [True, False], ids=["scatter_gather", "whole"])
def test_activations_cross_stages_exactly(scatter_gather):
    results = run_world(4, 2, 2, _exchange, scatter_gather, timeout_s=120)
    full = [s[0] * s[1] * s[2] for s in SHAPES]
    sent = [n // 2 for n in full] if scatter_gather else full  # each TP rank sends its 1/TP slice
    assert results[0] == results[1] == sent
    assert results[2] == results[3] == [True] * len(SHAPES)
