import random

import pytest


def test_batch_shares_use_the_engines_layouts():
    from configs.service import ParallelConfig
    from deployments.metrics import batch_shares
    from sharding.micro_batches import plan_micro_batches

    prompt = [7] * 60
    batch = [prompt + [1] * 20, prompt + [2] * 20, prompt + [3] * 20, [9] * 40]  # best-of-3 and one more
    forest = ParallelConfig(max_tokens_per_micro_batch=4096)
    assert batch_shares(batch, forest) == (60 + 3 * 20 + 40, 0.0, pytest.approx(1 - 160 / 280))
    padded = ParallelConfig(max_tokens_per_micro_batch=4096, batch_layout="padded")
    assert batch_shares(batch, padded) == (4 * 80, pytest.approx(1 - 280 / 320), 0.0)
    rng = random.Random(1)
    for layout in ("forest", "padded"):
        parallel = ParallelConfig(max_tokens_per_micro_batch=300, batch_layout=layout)
        for _ in range(10):
            batch = [prompt[:rng.randint(1, 60)] + [rng.randint(1, 3)] * rng.randint(0, 200) for _ in range(12)]
            micro, _ = plan_micro_batches(batch, parallel)
            engine = sum(m.num_tokens if layout == "forest" else m[0].size for m in micro)
            assert batch_shares(batch, parallel)[0] == engine
