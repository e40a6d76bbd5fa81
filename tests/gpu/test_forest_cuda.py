"""GPU tier: token-forest batches on CUDA (bf16, flex_attention with a block mask; also the dense and branch
kernels) against each sequence scored alone on the same GPU. Prints the max abs diff. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOL = 0.05  # bf16: a sequence in a forest row vs alone (different kernels and shapes round differently)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Written in a child process with CUDA hidden: the CPU-side writer installs the CPU workarounds, which
    refuse a process that has CUDA (`tests/gpu/cpu_side.py`)."""
    from tests.gpu import cpu_side

    return cpu_side.run("demo_model", out=str(tmp_path_factory.mktemp("gpu_forest") / "demo"), seed=0)["checkpoint"]


@pytest.fixture(scope="module")
def token_batch():
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, 2000, size=700).tolist()
    batch = [prompt + rng.integers(4, 2000, size=int(n)).tolist() for n in (1, 40, 300, 300, 129)]  # best-of-N
    batch += [batch[2][:750], batch[3], rng.integers(4, 2000, size=2000).tolist(), [5, 6]]
    return batch


@pytest.mark.parametrize("kernel", ["flex", "dense", "branches"])
def test_forest_bf16_equals_each_sequence_alone(checkpoint, token_batch, kernel):
    from configs.service import ParallelConfig, RuntimeConfig
    from sharding.local import LocalScorer

    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", backend="nccl", gpus_per_node=1,
                            forest_attention=kernel)
    scorer = LocalScorer(str(checkpoint), runtime)
    try:
        alone = np.concatenate([scorer.score([t]) for t in token_batch])
        forest = scorer.score_micro_batches(token_batch, ParallelConfig(max_tokens_per_micro_batch=4096))
    finally:
        scorer.close()
    diff = float(np.abs(forest - alone).max())
    print(f"forest ({kernel}) vs alone, bf16 cuda: max abs diff {diff}")
    assert diff <= BF16_TOL
