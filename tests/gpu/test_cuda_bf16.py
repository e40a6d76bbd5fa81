"""GPU tier: the same code on CUDA + bf16 + NCCL, selected by config alone. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOL = 0.1  # bf16 weights and activations vs the float32 CPU forward of the same checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("gpu") / "demo", seed=0)


@pytest.fixture(scope="module")
def token_batch():
    rng = np.random.default_rng(0)
    return [rng.integers(4, 2000, size=n).tolist() for n in (7, 300, 41, 1024, 2)]


@pytest.fixture(scope="module")
def cpu_reference(checkpoint, token_batch):
    from sharding.local import LocalScorer

    scorer = LocalScorer(str(checkpoint))
    try:
        return scorer.score(token_batch)
    finally:
        scorer.close()


def test_local_forward_bf16_cuda(checkpoint, token_batch, cpu_reference):
    from configs.service import RuntimeConfig
    from sharding.local import LocalScorer

    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", backend="nccl", gpus_per_node=1)
    scorer = LocalScorer(str(checkpoint), runtime)
    try:
        assert next(scorer.model.parameters()).dtype == torch.bfloat16
        assert scorer.model.rm_head.weight.dtype == torch.float32
        rewards = scorer.score(token_batch)
    finally:
        scorer.close()
    assert rewards.dtype == np.float32
    np.testing.assert_allclose(rewards, cpu_reference, atol=BF16_TOL, rtol=0)


def test_engine_in_ray_with_nccl(checkpoint, token_batch, cpu_reference):
    import ray

    from configs.service import ServiceConfig
    from tests.engine_runner import score_with_engine

    config = ServiceConfig.model_validate({
        "checkpoint_path": str(checkpoint),
        "runtime": {"device": "cuda", "dtype": "bfloat16", "backend": "nccl", "gpus_per_node": 1},
    })
    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        rewards = score_with_engine(config, token_batch)
    finally:
        ray.shutdown()
    np.testing.assert_allclose(rewards, cpu_reference, atol=BF16_TOL, rtol=0)
