"""GPU tier: the zarr reader fills CUDA bfloat16 parameters (chunks copied host -> device), packed or not,
to exactly the values torch_dist loads. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH = [[5, 6, 7, 8, 9], list(range(20, 300)), [42]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import sentencepiece as spm

    from tests.checkpoint_writers import TINY_SHAPE, padded_vocab, reference_weights, write_checkpoint, write_tokenizer

    root = tmp_path_factory.mktemp("gpu-formats")
    tok = root / "tok"
    tok.mkdir()
    size = spm.SentencePieceProcessor(model_file=str(tok / write_tokenizer(tok))).get_piece_size()
    weights = reference_weights(TINY_SHAPE, padded_vocab(size), seed=5)
    return {
        "torch_dist": write_checkpoint(root / "td", weights, TINY_SHAPE, backend="torch_dist", tokenizer_from=tok),
        "zarr": write_checkpoint(root / "zarr", weights, TINY_SHAPE, backend="zarr", tokenizer_from=tok),
        "zarr-tar": write_checkpoint(root / "zarr.nemo", weights, TINY_SHAPE, backend="zarr", packed=True,
                                     tokenizer_from=tok),
    }


def _load(path):
    from configs.service import RuntimeConfig
    from sharding.local import LocalScorer

    scorer = LocalScorer(str(path), RuntimeConfig(device="cuda", dtype="bfloat16", backend="nccl", gpus_per_node=1))
    try:
        params = {k: v.detach().cpu() for k, v in scorer.model.state_dict().items() if isinstance(v, torch.Tensor)}
        return params, scorer.score(BATCH)
    finally:
        scorer.close()


def test_zarr_to_cuda_bf16_equals_torch_dist(checkpoints):
    ref_params, ref_scores = _load(checkpoints["torch_dist"])
    assert ref_params["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    for name in ("zarr", "zarr-tar"):
        params, scores = _load(checkpoints[name])
        assert params.keys() == ref_params.keys()
        for key, value in params.items():
            assert torch.equal(value, ref_params[key]), (name, key)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0, err_msg=name)
