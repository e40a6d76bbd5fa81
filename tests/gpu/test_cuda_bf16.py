"""GPU tier: the same code on CUDA + bf16 + NCCL, selected by config alone, at every batch layout of the
engine. Skipped without CUDA (see conftest for --tier-device cpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.service import ParallelConfig
from tests.gpu import cpu_side

BF16_TOL = 0.1  # bf16 weights and activations vs the float32 CPU forward of the same checkpoint
# parallel.max_tokens_per_micro_batch: two padded micro-batches ([1024], [300, 41, 7, 2]), one forest row
MAX_TOKENS_PER_MICRO_BATCH = 1536
LAYOUTS = ["padded", "forest"]


@pytest.fixture(scope="module")
def token_batch():
    rng = np.random.default_rng(0)
    return [rng.integers(4, 2000, size=n).tolist() for n in (7, 300, 41, 1024, 2)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, token_batch):
    """(checkpoint path, float32 CPU rewards): written and scored with CUDA hidden."""
    out = tmp_path_factory.mktemp("gpu") / "demo"
    reference = cpu_side.run("demo_reference", out=str(out), seed=0, token_batch=token_batch)
    return out, np.asarray(reference["rewards"], dtype=np.float32)


def forward_at_layout(scorer, token_batch, layout: str) -> np.ndarray:
    """The engine's micro-batches of one batch at `layout`, forwarded in this process; rewards in batch order."""
    parallel = ParallelConfig(batch_layout=layout, max_tokens_per_micro_batch=MAX_TOKENS_PER_MICRO_BATCH)
    return scorer.score_micro_batches(token_batch, parallel)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_forward_bf16_cuda(demo, token_batch, runtime, layout):
    from sharding.local import LocalScorer
    from sharding.model import DTYPES

    checkpoint, cpu_reference = demo
    scorer = LocalScorer(str(checkpoint), runtime)
    try:
        assert next(scorer.model.parameters()).dtype == DTYPES[runtime.dtype]
        assert scorer.model.rm_head.weight.dtype == torch.float32
        rewards = forward_at_layout(scorer, token_batch, layout)
    finally:
        scorer.close()
    assert rewards.dtype == np.float32
    np.testing.assert_allclose(rewards, cpu_reference, atol=BF16_TOL, rtol=0)


def test_engine_in_ray_with_nccl(demo, token_batch, runtime):
    if runtime.device != "cuda":
        pytest.skip("Ray on CPU is the integration tier's")
    ray = pytest.importorskip("ray", reason="Ray is not installed (bench.gpu_check runs this tier without it)")
    from configs.service import ServiceConfig
    from tests.engine_runner import score_with_engine

    checkpoint, cpu_reference = demo
    config = ServiceConfig.model_validate({"checkpoint_path": str(checkpoint), "runtime": runtime.model_dump()})
    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        rewards = score_with_engine(config, token_batch)
    finally:
        ray.shutdown()
    np.testing.assert_allclose(rewards, cpu_reference, atol=BF16_TOL, rtol=0)
