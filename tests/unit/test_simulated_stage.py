"""The simulated stage without Ray: pseudo-rewards depend only on a sequence's tokens (every layout reads the
same), the stand-in activation carries arrival time and rows, and a stage refuses another micro-batch's."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from configs.service import ParallelConfig, RuntimeConfig
from sharding.micro_batches import plan_micro_batches
from sharding.simulated import SimulatedStage, pseudo_rewards, scored_sequences
from tests.unit.test_cost_model import arch

RUNTIME = RuntimeConfig(device="simulated", simulated_accelerator="h100-sxm", dtype="bfloat16")


def batch(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, 30, 40).tolist()
    out = [prompt + rng.integers(1, 30, int(n)).tolist() for n in rng.integers(1, 30, 6)]  # best-of-6
    out += [rng.integers(1, 30, int(n)).tolist() for n in rng.integers(1, 90, 5)]  # unrelated
    return out + [out[0], prompt]  # a duplicate, and a prefix of others


@pytest.mark.parametrize("layout,budget", [("forest", 128), ("forest", 4096), ("padded", 256)])
def test_every_layout_reads_each_sequence(layout, budget):
    tokens = batch(0)
    micro_batches, order = plan_micro_batches(tokens, ParallelConfig(batch_layout=layout,
                                                                     max_tokens_per_micro_batch=budget))
    read = [seq for mb in micro_batches for seq in scored_sequences(mb)]
    assert len(read) == len(tokens)
    for row, i in enumerate(order):
        assert read[row].tolist() == tokens[i]


def test_pseudo_rewards_depend_on_tokens_alone():
    a, b = pseudo_rewards(np.array([1, 2, 3]), 9), pseudo_rewards([1, 2, 3], 9)
    assert a.dtype == np.float32 and a.shape == (9,) and np.array_equal(a, b)
    assert not np.array_equal(a, pseudo_rewards([1, 2, 4], 9))
    assert not np.array_equal(a, pseudo_rewards([1, 2], 9))


def test_stage_waits_and_checks_the_order():
    model = arch(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8, num_query_groups=2)
    parallel = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    first, last = SimulatedStage(model, parallel, RUNTIME, 0), SimulatedStage(model, parallel, RUNTIME, 1)
    (row,), _ = plan_micro_batches([[1, 2, 3], [1, 2, 4]], parallel)
    assert first.activation_shape(row) == (2, 2)
    stand_in = first.run(row, None)
    assert stand_in.shape == (2, 2) and stand_in.dtype == torch.float64
    assert (stand_in[:, 1] == row.num_tokens).all() and stand_in[0, 0] >= time.time() - 1
    rewards = last.run(row, stand_in)
    np.testing.assert_array_equal(rewards.numpy(), np.stack([pseudo_rewards([1, 2, 3], 9),
                                                             pseudo_rewards([1, 2, 4], 9)]))
    assert first.stats()["micro_batches"] == 1 and first.stats()["busy_s"] == pytest.approx(
        first.time_of(row).busy_s)
    wrong = stand_in.clone()
    wrong[:, 1] = 99
    with pytest.raises(RuntimeError, match="99-row micro-batch for its 4-row one"):
        last.run(row, wrong)
