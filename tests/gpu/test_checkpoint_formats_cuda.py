"""GPU tier: the zarr reader fills CUDA bfloat16 parameters (chunks copied host -> device), packed or not,
to exactly the values torch_dist loads. Skipped without CUDA (see conftest for --tier-device cpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.gpu import cpu_side

BATCH = [[5, 6, 7, 8, 9], list(range(20, 300)), [42]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return cpu_side.run("format_checkpoints", root=str(tmp_path_factory.mktemp("gpu-formats") / "ckpts"))


def _load(path, runtime):
    from sharding.local import LocalScorer

    scorer = LocalScorer(str(path), runtime)
    try:
        params = {k: v.detach().cpu() for k, v in scorer.model.state_dict().items() if isinstance(v, torch.Tensor)}
        return params, scorer.score(BATCH)
    finally:
        scorer.close()


def test_zarr_to_cuda_bf16_equals_torch_dist(checkpoints, runtime):
    from sharding.model import DTYPES

    ref_params, ref_scores = _load(checkpoints["torch_dist"], runtime)
    assert ref_params["embedding.word_embeddings.weight"].dtype == DTYPES[runtime.dtype]
    for name in ("zarr", "zarr-tar"):
        params, scores = _load(checkpoints[name], runtime)
        assert params.keys() == ref_params.keys()
        for key, value in params.items():
            assert torch.equal(value, ref_params[key]), (name, key)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0, err_msg=name)
