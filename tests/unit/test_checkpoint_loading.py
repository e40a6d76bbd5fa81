"""Loading the tiny checkpoints in one process (TP1): zarr against torch_dist of the same values, what is
and is not read, errors that name the problem, `dist_checkpointing.load` with our strategy, and the
checkpoint tool (inspect, convert)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sharding.checkpoints.dist_readers import ZarrLoadShardedStrategy, tensor_infos
from sharding.checkpoints.nemo_weights import load_weights, sharded_state_dict
from sharding.checkpoints.cli import inspect_checkpoint, main as tool_main, per_rank_memory
from sharding.local import LocalScorer
from sharding.checkpoints.nemo import CheckpointFormatError, NemoCheckpoint
from tests.checkpoint_writers import (
    TINY_SHAPE,
    TP_SPLIT_AXIS,
    padded_vocab,
    reference_weights,
    tp_chunks,
    write_checkpoint,
    write_tokenizer,
)

BATCH = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 90))]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="module")
def tokenizer_dir(root):
    folder = root / "tokenizer"
    folder.mkdir()
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def weights(tokenizer_dir):
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=str(next(tokenizer_dir.iterdir()))).get_piece_size()
    return reference_weights(TINY_SHAPE, padded_vocab(size), seed=11)


@pytest.fixture(scope="module")
def torch_dist_ckpt(root, weights, tokenizer_dir):
    return write_checkpoint(root / "torch_dist", weights, TINY_SHAPE, backend="torch_dist", tokenizer_from=tokenizer_dir)


@pytest.fixture(scope="module")
def zarr_ckpt(root, weights, tokenizer_dir):
    return write_checkpoint(root / "zarr", weights, TINY_SHAPE, backend="zarr", tokenizer_from=tokenizer_dir)


@pytest.fixture(scope="module")
def reference(torch_dist_ckpt):
    scorer = LocalScorer(str(torch_dist_ckpt))
    try:
        return scorer.score(BATCH)
    finally:
        scorer.close()


def _score(path) -> tuple[np.ndarray, dict]:
    scorer = LocalScorer(str(path))
    try:
        params = {k: v.detach().clone() for k, v in scorer.model.state_dict().items() if v is not None}
        return scorer.score(BATCH), params
    finally:
        scorer.close()


def test_zarr_bf16_equals_torch_dist_float32(zarr_ckpt, reference):
    scores, _ = _score(zarr_ckpt)
    assert scores.shape == (3, 9) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["<f4", "<f2"])
def test_zarr_float32_and_float16_arrays(root, weights, tokenizer_dir, dtype, reference):
    path = write_checkpoint(root / f"zarr{dtype[1:]}", weights, TINY_SHAPE, backend="zarr", zarr_dtype=dtype,
                            tokenizer_from=tokenizer_dir)
    scores, params = _score(path)
    if dtype == "<f4":
        np.testing.assert_allclose(scores, reference, atol=1e-5, rtol=0)
    # every loaded value is the reference value as that dtype stores it
    emb = weights["embedding.word_embeddings.weight"]
    want = emb.to(torch.float16).float() if dtype == "<f2" else emb
    assert torch.equal(params["embedding.word_embeddings.weight"], want)


def test_only_the_needed_tensors_are_read(root, zarr_ckpt, weights, reference):
    """The LM output layer and the TE extra state are never opened (their files are made unreadable here),
    and every byte of every other tensor is read exactly once at TP1."""
    path = root / "zarr-broken-output-layer"
    shutil.copytree(zarr_ckpt, path)
    for chunk in (path / "model_weights" / "model.output_layer.weight").iterdir():
        if chunk.name != ".zarray":
            chunk.write_bytes(b"garbage")
    extra_files = list((path / "model_weights").glob("*._extra_state/shard_*_4.pt"))
    assert len(extra_files) == 5 * 4
    for extra in extra_files:
        extra.write_bytes(b"not a pickle")
    scorer = LocalScorer(str(path))
    try:
        np.testing.assert_allclose(scorer.score(BATCH), reference, atol=1e-5, rtol=0)
        report = load_weights(scorer.model, NemoCheckpoint.open(path).weights_dir)
    finally:
        scorer.close()
    assert report.backend == "zarr" and report.key_prefix == "model."
    read = report.zarr_stats.bytes_by_key
    assert "model.output_layer.weight" not in read
    expected = {f"model.{k}": v.numel() * 2 for k, v in weights.items() if k != "output_layer.weight"}
    assert read == expected


def test_rm_head_without_bias(root, weights, tokenizer_dir):
    no_bias = {k: v for k, v in weights.items() if k != "rm_head.bias"}
    path = write_checkpoint(root / "zarr-nobias", no_bias, TINY_SHAPE, backend="zarr", tokenizer_from=tokenizer_dir)
    assert NemoCheckpoint.open(path).arch.rm_head_bias is False
    scorer = LocalScorer(str(path))
    try:
        assert scorer.model.rm_head.bias is None
        assert np.isfinite(scorer.score(BATCH)).all()
    finally:
        scorer.close()


def test_missing_tensor_and_wrong_shape_are_named(root, zarr_ckpt):
    path = root / "zarr-missing"
    shutil.copytree(zarr_ckpt, path)
    shutil.rmtree(path / "model_weights" / "model.decoder.layers.mlp.linear_fc2.weight")
    with pytest.raises(CheckpointFormatError, match="missing model.decoder.layers.mlp.linear_fc2.weight"):
        LocalScorer(str(path)).close()
    _close_process_group()
    path = root / "zarr-wrong-shape"
    shutil.copytree(zarr_ckpt, path)
    zarray = path / "model_weights" / "model.rm_head.weight" / ".zarray"
    meta = json.loads(zarray.read_text())
    zarray.write_text(json.dumps({**meta, "shape": [5, 256], "chunks": [5, 32]}))
    with pytest.raises(CheckpointFormatError, match=r"model.rm_head.weight has shape \[5, 256\], the model expects \[9, 256\]"):
        LocalScorer(str(path)).close()
    _close_process_group()


def _close_process_group():
    from sharding.process_group import destroy_model_parallel

    destroy_model_parallel()


def test_strategy_works_with_dist_checkpointing_load(zarr_ckpt, torch_dist_ckpt, reference):
    """The zarr strategy is a regular megatron-core LoadShardedStrategy."""
    from megatron.core import dist_checkpointing

    scorer = LocalScorer(str(torch_dist_ckpt))
    try:
        with torch.no_grad():
            for p in scorer.model.parameters():
                p.zero_()
        sd = sharded_state_dict(scorer.model, "model.")
        loaded = dist_checkpointing.load(sd, str(zarr_ckpt / "model_weights"), sharded_strategy=ZarrLoadShardedStrategy())
        scorer.model.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=False)
        np.testing.assert_allclose(scorer.score(BATCH), reference, atol=1e-5, rtol=0)
    finally:
        scorer.close()


def test_convert_zarr_to_torch_dist(root, zarr_ckpt, reference, capsys):
    out = root / "converted"
    assert tool_main(["convert", str(zarr_ckpt), str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == 14 and summary["key_prefix"] == "model."
    assert json.loads((out / "model_weights" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in zarr_ckpt.iterdir())
    # The TP 8 chunk layout survives: each zarr chunk is one torch_dist chunk.
    for key, info in tensor_infos(NemoCheckpoint.open(out).weights_files).items():
        name = key[len("model."):]
        assert info.chunks == (tp_chunks(name, info.shape),) and info.dtype == "bfloat16", key
    scores, _ = _score(out)
    np.testing.assert_allclose(scores, reference, atol=1e-5, rtol=0)
    # megatron-core's own default torch_dist loading reads it too
    from megatron.core import dist_checkpointing

    scorer = LocalScorer(str(zarr_ckpt))
    try:
        loaded = dist_checkpointing.load(sharded_state_dict(scorer.model, "model."), str(out / "model_weights"))
        assert set(loaded) >= {"model.rm_head.weight", "model.embedding.word_embeddings.weight"}
    finally:
        scorer.close()
    assert tool_main(["convert", str(zarr_ckpt), str(out)]) == 2  # refuses to overwrite
    out2 = root / "converted-lean.nemo-dir"
    assert tool_main(["convert", str(zarr_ckpt / "model_weights"), str(out2), "--drop-output-layer"]) == 0
    assert "model.output_layer.weight" not in tensor_infos(open_weights(out2))


def open_weights(path):
    from sharding.checkpoints.files import open_files

    return open_files(path)


def test_inspect(zarr_ckpt, capsys):
    assert tool_main(["inspect", str(zarr_ckpt), "--tp", "2", "--pp", "2"]) == 0
    text = capsys.readouterr().out
    assert "backend zarr v1, key prefix 'model.'" in text
    assert "model.output_layer.weight" in text and "not loaded" in text
    assert "linear_qkv.weight" in text and "4x512x256  bfloat16  chunks 1x64x256" in text
    assert "TP 2 x PP 2" in text and "stage 1 (layers 2-3, final_layernorm, rm_head)" in text
    r = inspect_checkpoint(zarr_ckpt, tp=2, pp=2, dtype="float32")
    hidden, ffn, vocab, layers = 256, 1024, 2048, 4
    qkv = (16 + 2 * 8) * 16 * hidden
    per_layer = qkv + hidden * hidden + 2 * ffn * hidden + 4 * hidden
    assert r["parameters"]["loaded"] == vocab * hidden + layers * per_layer + 2 * hidden + 9 * hidden + 9
    assert r["parameters"]["stored"] == r["parameters"]["loaded"] + vocab * hidden
    stage0, stage1 = r["per_rank"]["stages"]
    tp_layer = (qkv + hidden * hidden + 2 * ffn * hidden) // 2 + 4 * hidden
    assert stage0["parameters_per_rank"] == vocab * hidden // 2 + 2 * tp_layer
    assert stage1["parameters_per_rank"] == 2 * tp_layer + 2 * hidden + 9 * hidden // 2 + 9
    assert stage0["bytes_per_rank"] == 4 * stage0["parameters_per_rank"]
    assert json.loads(_json_inspect(zarr_ckpt, capsys))["backend"] == "zarr"


def _json_inspect(path, capsys) -> str:
    assert tool_main(["inspect", str(path), "--json"]) == 0
    return capsys.readouterr().out


def test_per_rank_memory_of_the_release():
    """Nemotron-4-340B at TP 8 x PP 2 in bf16: ~42.6 GB on a first-stage GPU (README's '~43 GB')."""
    from sharding.checkpoints.dist_readers import TensorInfo
    from tests.checkpoint_writers import reference_shapes

    shape = {"num_layers": 96, "hidden_size": 18432, "ffn_hidden_size": 73728, "num_attention_heads": 96,
             "num_query_groups": 8}
    infos = {f"model.{k}": TensorInfo(f"model.{k}", s, "bfloat16", (tp_chunks(k, s),))
             for k, s in reference_shapes(shape, 256000).items()}
    r = per_rank_memory(infos, "model.", tp=8, pp=2, dtype="bfloat16", num_layers=96)
    assert not r["problems"]
    stage0, stage1 = r["stages"]
    assert 42.5e9 < stage0["bytes_per_rank"] < 42.8e9
    assert 41.3e9 < stage1["bytes_per_rank"] < 41.6e9
    assert sum(i.numel for i in infos.values()) == pytest.approx(341.0e9, rel=1e-3)
    assert set(TP_SPLIT_AXIS) == set(reference_shapes(shape, 256000))
    assert per_rank_memory(infos, "model.", tp=16, pp=5, dtype="bfloat16", num_layers=96)["problems"]
