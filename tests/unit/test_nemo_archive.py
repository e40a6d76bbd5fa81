"""NeMo checkpoints as directories and packed .nemo files: file access inside the tar, the config and
tokenizer, the weights' backend and key prefix, and the reward head's bias read from the weights."""

from __future__ import annotations

import gzip
import io
import json
import shutil

import numpy as np
import pytest
import torch

from sharding.checkpoints.files import CheckpointFilesError, TarFiles, open_files
from sharding.checkpoints.nemo import CheckpointFormatError, NemoCheckpoint, read_weights_format
from tests.checkpoint_writers import (
    TINY_SHAPE,
    nemotron_model_config,
    pack_nemo,
    padded_vocab,
    reference_shapes,
    write_backend_files,
    write_model_config,
    write_zarr_array,
)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tests.checkpoint_writers import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    return folder / write_tokenizer(folder)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REWARD_SERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _zarr_names_only(weights, prefix: str, rm_head_bias: bool = True) -> None:
    """A zarr model_weights/ with the right keys and shapes (a single zero chunk per array is enough here)."""
    for key, shape in reference_shapes(TINY_SHAPE, 2048, rm_head_bias=rm_head_bias).items():
        write_zarr_array(weights / f"{prefix}{key}", shape, shape, "bfloat16",
                         lambda box: np.zeros([s.stop - s.start for s in box], dtype="<u2"))
    write_backend_files(weights, "zarr")


def _checkpoint(tmp_path, tokenizer_file, prefix="model.", rm_head_bias=True, name="ckpt"):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(tokenizer_file, folder / tokenizer_file.name)
    write_model_config(folder, nemotron_model_config(tokenizer_file.name, TINY_SHAPE))
    _zarr_names_only(folder / "model_weights", prefix, rm_head_bias)
    return folder


def test_directory_checkpoint(tmp_path, tokenizer_file):
    ck = NemoCheckpoint.open(_checkpoint(tmp_path, tokenizer_file))
    assert not ck.packed
    assert ck.tokenizer_path == ck.path / tokenizer_file.name
    assert ck.weights_dir == ck.path / "model_weights"
    fmt = ck.weights_format
    assert (fmt.backend, fmt.version, fmt.key_prefix) == ("zarr", 1, "model.")
    arch = ck.arch
    assert (arch.num_layers, arch.num_attention_heads, arch.num_query_groups, arch.head_dim) == (4, 16, 8, 16)
    assert arch.normalization == "layernorm1p" and arch.activation == "squared-relu"
    assert arch.rotary_percentage == 0.5 and not arch.bias and arch.num_attributes == 9
    assert arch.padded_vocab_size == padded_vocab(2048) == 2048 and arch.max_position_embeddings == 4096


def test_packed_checkpoint_reads_in_place(tmp_path, tokenizer_file, cache_dir):
    tar_path = pack_nemo(_checkpoint(tmp_path, tokenizer_file), tmp_path / "model.nemo")
    shutil.rmtree(tmp_path / "ckpt")
    ck = NemoCheckpoint.open(tar_path)
    assert ck.packed and ck.path == tar_path
    assert ck.raw_config["tokenizer"]["model"] == f"nemo:{tokenizer_file.name}"
    # Only the tokenizer is copied out (SentencePiece wants a path), into the cache.
    assert ck.tokenizer_path.parent.parent.parent == cache_dir
    assert ck.tokenizer_path.read_bytes() == tokenizer_file.read_bytes()
    assert [p.name for p in cache_dir.rglob("*") if p.is_file()] == [tokenizer_file.name]
    assert ck.weights_dir == tar_path / "model_weights"
    files = open_files(ck.weights_dir)  # what a worker does with the path it is given
    assert isinstance(files, TarFiles) and files.is_dir("model.rm_head.weight")
    assert ck.weights_format.key_prefix == "model."
    assert ck.arch.num_layers == 4
    assert NemoCheckpoint.open(tar_path).tokenizer_path == ck.tokenizer_path  # cached once


def test_tokenizer_referenced_without_hash(tmp_path, tokenizer_file):
    folder = _checkpoint(tmp_path, tokenizer_file)
    base = tokenizer_file.name.split("_", 1)[1]
    write_model_config(folder, nemotron_model_config(base, TINY_SHAPE))  # "nemo:nemotron_2_256k.model"
    assert NemoCheckpoint.open(folder).tokenizer_path.name == tokenizer_file.name


@pytest.mark.parametrize("prefix", ["model.", "module.", ""], ids=["nemo1", "nemo2", "megatron-lm"])
def test_key_prefix_detection_zarr(tmp_path, tokenizer_file, prefix):
    ck = NemoCheckpoint.open(_checkpoint(tmp_path, tokenizer_file, prefix=prefix))
    assert ck.weights_format.key_prefix == prefix
    assert ck.weights_format.has("rm_head.bias")


@pytest.mark.parametrize("prefix", ["model.", "module.", ""])
def test_key_prefix_detection_torch_dist_without_unpickling(tmp_path, prefix):
    import torch.distributed.checkpoint as dcp

    weights = tmp_path / "w"
    state = {f"{prefix}decoder.final_layernorm.weight": torch.zeros(4), f"{prefix}rm_head.weight": torch.zeros(9, 4)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(weights)), no_dist=True)
    write_backend_files(weights, "torch_dist")
    fmt = read_weights_format(open_files(weights))
    assert (fmt.backend, fmt.key_prefix) == ("torch_dist", prefix)
    assert fmt.has("rm_head.weight") and not fmt.has("rm_head.bias")


@pytest.mark.parametrize("bias", [True, False])
def test_rm_head_bias_follows_the_checkpoint(tmp_path, tokenizer_file, bias):
    ck = NemoCheckpoint.open(_checkpoint(tmp_path, tokenizer_file, rm_head_bias=bias))
    assert ck.arch.rm_head_bias is bias


def test_unknown_prefix_and_backend_are_named(tmp_path):
    weights = tmp_path / "w"
    write_zarr_array(weights / "net.layers.0.weight", (2,), (2,), "<f4", lambda box: np.zeros(2, "<f4"))
    write_backend_files(weights, "zarr")
    with pytest.raises(CheckpointFormatError, match="prefixes"):
        read_weights_format(open_files(weights))
    (weights / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr3", "sharded_backend_version": 1}))
    with pytest.raises(CheckpointFormatError, match="zarr3"):
        read_weights_format(open_files(weights))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointFormatError, match="model_config.yaml"):
        NemoCheckpoint.open(tmp_path)
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        NemoCheckpoint.open(tmp_path / "nope")


def test_compressed_nemo_is_refused_with_advice(tmp_path, tokenizer_file):
    tar_path = pack_nemo(_checkpoint(tmp_path, tokenizer_file), tmp_path / "m.tar")
    gz = tmp_path / "m.nemo"
    gz.write_bytes(gzip.compress(tar_path.read_bytes()))
    with pytest.raises(CheckpointFilesError, match="uncompressed tar"):
        NemoCheckpoint.open(gz)


def test_range_reader_is_a_seekable_window(tmp_path, tokenizer_file):
    tar_path = pack_nemo(_checkpoint(tmp_path, tokenizer_file), tmp_path / "m.nemo")
    files = open_files(tar_path)
    data = (tmp_path / "ckpt" / "model_config.yaml").read_bytes()
    with files.open("model_config.yaml") as f:
        assert f.read() == data
        f.seek(10)
        assert f.read(5) == data[10:15] and f.tell() == 15
        f.seek(-4, io.SEEK_END)
        assert f.read() == data[-4:]
        assert f.read() == b""
    assert files.listdir("") == sorted(["model_config.yaml", "model_weights", tokenizer_file.name])
