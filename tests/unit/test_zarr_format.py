"""Zarr v2 as the released checkpoint stores it: metadata parsing, chunk-grid intersection and region reads
(bfloat16, float32, float16; edge chunks; directory and packed .nemo), against plain numpy."""

from __future__ import annotations

import itertools
import json
import tarfile

import numpy as np
import pytest
import torch

from sharding.checkpoints.files import DirectoryFiles, open_files
from sharding.checkpoints.zarr import (
    ZarrArrayMeta,
    ZarrFormatError,
    chunk_overlaps,
    list_arrays,
    open_chunk,
    read_meta,
    read_region,
)
from tests.checkpoint_writers import pack_nemo, tp_chunks, write_zarr_array, zarray_text

RELEASE_FIELDS = {"chunks", "compressor", "dtype", "fill_value", "filters", "order", "shape", "zarr_format"}


def test_zarray_fields_are_the_released_ones():
    text = zarray_text([96, 21504, 18432], [1, 2688, 18432], "bfloat16")
    meta = json.loads(text)
    assert set(meta) == RELEASE_FIELDS
    assert meta == {"chunks": [1, 2688, 18432], "compressor": None, "dtype": "bfloat16", "fill_value": None,
                    "filters": None, "order": "C", "shape": [96, 21504, 18432], "zarr_format": 2}
    # The reader's own serialisation agrees byte for byte with the writer's.
    assert ZarrArrayMeta.parse(text, "k").to_json() == text


@pytest.mark.parametrize(
    "key,shape,chunks",
    [
        ("decoder.layers.self_attention.linear_qkv.weight", (96, 21504, 18432), (1, 2688, 18432)),
        ("decoder.layers.self_attention.linear_proj.weight", (96, 18432, 18432), (1, 18432, 2304)),
        ("decoder.layers.mlp.linear_fc1.weight", (96, 73728, 18432), (1, 9216, 18432)),
        ("decoder.layers.mlp.linear_fc2.weight", (96, 18432, 73728), (1, 18432, 9216)),
        ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (96, 18432), (1, 18432)),
        ("embedding.word_embeddings.weight", (256000, 18432), (32000, 18432)),
        ("output_layer.weight", (256000, 18432), (32000, 18432)),
        ("rm_head.weight", (9, 18432), (9, 2304)),
        ("decoder.final_layernorm.bias", (18432,), (18432,)),
    ],
)
def test_tp8_chunking_of_the_340b_shapes(key, shape, chunks):
    assert tp_chunks(key, shape, 8) == chunks


def test_parse_rejects_what_it_cannot_read():
    base = {"chunks": [2], "compressor": None, "dtype": "<f4", "fill_value": None, "filters": None, "order": "C",
            "shape": [4], "zarr_format": 2}
    ZarrArrayMeta.parse(json.dumps(base))
    for change, message in [({"compressor": {"id": "blosc"}}, "compressor"), ({"order": "F"}, "order"),
                            ({"zarr_format": 3}, "zarr_format"), ({"dtype": "<c8"}, "dtype"),
                            ({"filters": [{"id": "delta"}]}, "filters"), ({"chunks": [2, 2]}, "chunks")]:
        with pytest.raises(ZarrFormatError, match=message):
            ZarrArrayMeta.parse(json.dumps({**base, **change}), "k")


def _brute_force(shape, chunks, start, box):
    """chunk index -> (src, dst) by enumerating every element."""
    out = {}
    for pos in itertools.product(*(range(s, s + n) for s, n in zip(start, box))):
        idx = tuple(p // c for p, c in zip(pos, chunks))
        out.setdefault(idx, []).append(pos)
    return out


@pytest.mark.parametrize("shape,chunks,start,box", [
    ((4, 12, 6), (1, 3, 6), (1, 0, 0), (1, 6, 6)),
    ((4, 12, 6), (1, 3, 6), (0, 4, 1), (2, 5, 4)),
    ((10, 7), (4, 3), (3, 2), (6, 5)),   # edge chunks (shape not a multiple of chunks)
    ((10, 7), (4, 3), (0, 0), (10, 7)),
    ((9,), (9,), (2,), (5,)),
])
def test_chunk_overlaps_cover_the_box_exactly(shape, chunks, start, box):
    meta = ZarrArrayMeta("k", shape, chunks, "<f4", None)
    got = list(chunk_overlaps(meta, start, box))
    want = _brute_force(shape, chunks, start, box)
    assert [g[0] for g in got] == sorted(want)
    covered = np.zeros(box, dtype=int)
    for index, src, dst in got:
        covered[dst] += 1
        for s, d, i, c, s0 in zip(src, dst, index, chunks, start):
            assert s.stop - s.start == d.stop - d.start
            assert i * c + s.start == s0 + d.start  # same global position
    assert (covered == 1).all()


def test_request_outside_the_array_is_an_error():
    meta = ZarrArrayMeta("k", (4, 6), (2, 3), "<f4", None)
    with pytest.raises(ZarrFormatError, match="axis 1"):
        list(chunk_overlaps(meta, (0, 4), (2, 3)))


def _write(tmp_path, name, values: np.ndarray, chunks, dtype):
    write_zarr_array(tmp_path / name, values.shape, chunks, dtype, lambda box: values[box])


@pytest.mark.parametrize("dtype", ["bfloat16", "<f4", "<f2"])
@pytest.mark.parametrize("packed", [False, True], ids=["dir", "tar"])
def test_region_reads_equal_numpy(tmp_path, dtype, packed):
    rng = np.random.default_rng(0)
    full = torch.from_numpy(rng.standard_normal((3, 10, 7)).astype(np.float32))
    if dtype == "bfloat16":
        storage = full.to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    else:
        storage = full.numpy().astype(dtype)
    root = tmp_path / "ckpt"
    _write(root / "w", "arr", storage, (1, 4, 3), dtype)
    files = DirectoryFiles(root).subdir("w")
    if packed:
        pack_nemo(root, tmp_path / "ckpt.nemo")
        files = open_files(tmp_path / "ckpt.nemo" / "w")
        assert files.packed
    assert list_arrays(files) == ["arr"]
    meta = read_meta(files, "arr")
    assert meta.shape == (3, 10, 7) and meta.chunks == (1, 4, 3) and meta.is_bfloat16 == (dtype == "bfloat16")
    for start, box in [((0, 0, 0), (3, 10, 7)), ((1, 3, 2), (2, 6, 5)), ((2, 9, 6), (1, 1, 1))]:
        got = read_region(files, meta, start, box)
        want = storage[tuple(slice(s, s + n) for s, n in zip(start, box))]
        np.testing.assert_array_equal(got, want)


def test_chunk_files_are_raw_little_endian_c_order(tmp_path):
    values = np.arange(24, dtype="<f4").reshape(4, 6)
    _write(tmp_path, "a", values, (2, 3), "<f4")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".zarray", "0.0", "0.1", "1.0", "1.1"]
    assert (tmp_path / "a" / "0.1").read_bytes() == values[0:2, 3:6].astype("<f4").tobytes(order="C")
    chunk = open_chunk(DirectoryFiles(tmp_path), read_meta(DirectoryFiles(tmp_path), "a"), (1, 0))
    np.testing.assert_array_equal(chunk, values[2:4, 0:3])


def test_edge_chunks_are_stored_full_size(tmp_path):
    values = np.arange(10, dtype="<f4")
    _write(tmp_path, "a", values, (4,), "<f4")
    assert (tmp_path / "a" / "2").stat().st_size == 4 * 4  # 2 real values + 2 padding
    files = DirectoryFiles(tmp_path)
    np.testing.assert_array_equal(read_region(files, read_meta(files, "a"), (7,), (3,)), values[7:])


def test_missing_and_truncated_chunks(tmp_path):
    values = np.arange(8, dtype="<f4")
    _write(tmp_path, "a", values, (4,), "<f4")
    files = DirectoryFiles(tmp_path)
    (tmp_path / "a" / "1").unlink()
    with pytest.raises(ZarrFormatError, match="missing"):
        read_region(files, read_meta(files, "a"), (0,), (8,))
    zarray = json.loads((tmp_path / "a" / ".zarray").read_text())
    (tmp_path / "a" / ".zarray").write_text(json.dumps({**zarray, "fill_value": 0.0}))
    np.testing.assert_array_equal(read_region(files, read_meta(files, "a"), (2,), (4,)), [2, 3, 0, 0])
    (tmp_path / "a" / "0").write_bytes(b"\0" * 5)
    with pytest.raises(ZarrFormatError, match="compressed or truncated"):
        read_region(files, read_meta(files, "a"), (0,), (2,))


def test_memmap_reads_only_what_is_sliced(tmp_path):
    """A slice of a chunk map is a view; nothing is copied until it is used."""
    values = np.arange(4096 * 64, dtype="<f4").reshape(4096, 64)
    _write(tmp_path, "a", values, (4096, 64), "<f4")
    files = DirectoryFiles(tmp_path)
    chunk = open_chunk(files, read_meta(files, "a"), (0, 0))
    assert isinstance(chunk, np.memmap) and chunk.flags.writeable
    part = chunk[100:102]
    assert np.shares_memory(part, chunk)
    np.testing.assert_array_equal(part, values[100:102])
    part[:] = 0  # copy-on-write: the file is unchanged
    del part, chunk
    np.testing.assert_array_equal(np.fromfile(tmp_path / "a" / "0.0", dtype="<f4")[6400:6528], values[100:102].ravel())


def test_packed_members_are_not_extracted(tmp_path):
    values = np.arange(12, dtype="<f4").reshape(3, 4)
    _write(tmp_path / "src" / "model_weights", "model.x", values, (1, 4), "<f4")
    tar_path = pack_nemo(tmp_path / "src", tmp_path / "m.nemo")
    with tarfile.open(tar_path) as tar:
        assert all(n == "." or n.startswith("./") for n in tar.getnames())
    files = open_files(tar_path / "model_weights")
    r = files.byte_range("model.x/1.0")
    assert r.path == tar_path and r.offset % 512 == 0 and r.size == 16
    assert files.read_bytes("model.x/1.0") == values[1].tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nemo", "src"]  # nothing written next to it
