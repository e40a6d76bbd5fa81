import random

import pytest

from deployments.metrics import padded_tokens, padding_share


def test_padded_tokens_by_hand():
    assert padded_tokens([5, 1, 3, 2], micro_batch_size=2) == 5 * 2 + 2 * 2
    assert padded_tokens([4, 4, 4], micro_batch_size=8) == 12
    assert padding_share([4, 4], 2) == 0.0
    assert padding_share([4, 2], 2) == pytest.approx(0.25)


def test_padded_tokens_is_the_engines_layout():
    from sharding.micro_batches import make_micro_batches

    rng = random.Random(0)
    for _ in range(20):
        batch = [[1] * rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        micro, _ = make_micro_batches(batch, micro_batch_size=4)
        assert padded_tokens([len(t) for t in batch], 4) == sum(tokens.size for tokens, _ in micro)
