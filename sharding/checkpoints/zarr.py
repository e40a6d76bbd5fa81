"""Zarr v2 arrays as megatron-core's zarr backend wrote them (the released Nemotron-4-340B-Reward checkpoint).

One array per tensor key: a folder holding `.zarray` (JSON metadata) and one file per chunk, named by the
chunk's grid index joined with `.` (`0.3.0`). Chunks are uncompressed, C-order, little-endian, and always
full-size (an edge chunk is padded on disk). `dtype` is a numpy type string (`<f4`, `<f2`) or `bfloat16`,
which numpy does not know: those chunks are read as `uint16` and reinterpreted by the caller.

A reader asks for a box of the global array (start + shape), and `chunk_overlaps` says which chunk files
hold which part of it; `open_chunk` memory-maps a chunk file, so slicing it touches only the needed pages.
numpy only; torch conversion is the caller's business (`sharding.checkpoints.nemo_weights`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sharding.checkpoints.files import CheckpointFiles

ZARRAY = ".zarray"
BFLOAT16 = "bfloat16"


class ZarrFormatError(ValueError):
    """An array's metadata or chunks are not what this reader supports."""


@dataclass(frozen=True)
class ZarrArrayMeta:
    key: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str  # as written in .zarray
    fill_value: Any
    separator: str = "."

    @classmethod
    def parse(cls, raw: bytes | str, key: str = "?") -> ZarrArrayMeta:
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise ZarrFormatError(f"{key}/.zarray is not JSON: {e}") from None
        if meta.get("zarr_format") != 2:
            raise ZarrFormatError(f"{key}: zarr_format {meta.get('zarr_format')!r}; only 2 is supported")
        if meta.get("compressor") is not None:
            raise ZarrFormatError(
                f"{key}: compressor {meta['compressor']!r}; only uncompressed arrays are supported "
                "(megatron-core writes compressor null)"
            )
        if meta.get("filters"):
            raise ZarrFormatError(f"{key}: filters {meta['filters']!r} are not supported")
        if meta.get("order", "C") != "C":
            raise ZarrFormatError(f"{key}: order {meta['order']!r}; only C order is supported")
        shape, chunks = tuple(int(s) for s in meta["shape"]), tuple(int(c) for c in meta["chunks"])
        if len(shape) != len(chunks) or any(c < 1 for c in chunks):
            raise ZarrFormatError(f"{key}: chunks {list(chunks)} do not fit shape {list(shape)}")
        self = cls(key, shape, chunks, str(meta["dtype"]), meta.get("fill_value"),
                   meta.get("dimension_separator") or ".")
        self.storage_dtype  # validates dtype
        if self.separator not in (".", "/"):
            raise ZarrFormatError(f"{key}: dimension_separator {self.separator!r}")
        return self

    def to_json(self) -> str:
        """The `.zarray` text megatron-core's zarr strategy wrote (zarr-python's formatting)."""
        meta = {"chunks": list(self.chunks), "compressor": None, "dtype": self.dtype, "fill_value": self.fill_value,
                "filters": None, "order": "C", "shape": list(self.shape), "zarr_format": 2}
        return json.dumps(meta, indent=4, sort_keys=True, ensure_ascii=True, separators=(",", ": "))

    @property
    def is_bfloat16(self) -> bool:
        return self.dtype == BFLOAT16

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype of the bytes on disk (uint16 for bfloat16)."""
        if self.is_bfloat16:
            return np.dtype("<u2")
        try:
            dt = np.dtype(self.dtype)
        except TypeError:
            raise ZarrFormatError(f"{self.key}: unknown dtype {self.dtype!r}") from None
        if dt.kind not in "fiub" or dt.itemsize > 8:
            raise ZarrFormatError(f"{self.key}: dtype {self.dtype!r} is not supported")
        return dt

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.storage_dtype.itemsize

    def chunk_name(self, index: tuple[int, ...]) -> str:
        # zarr v2 names a 0-d array's only chunk "0"
        return self.separator.join(str(i) for i in index) if index else "0"


def chunk_overlaps(meta: ZarrArrayMeta, start: tuple[int, ...], shape: tuple[int, ...]
                   ) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """For the box [start, start + shape) of the array: (chunk index, slices into that chunk, slices into
    the box) for every chunk the box touches, in C order of the chunk grid."""
    if len(start) != len(meta.shape) or len(shape) != len(meta.shape):
        raise ZarrFormatError(f"{meta.key}: a {len(shape)}-d request for a {len(meta.shape)}-d array")
    for d, (s0, n, total) in enumerate(zip(start, shape, meta.shape)):
        if s0 < 0 or n < 0 or s0 + n > total:
            raise ZarrFormatError(
                f"{meta.key}: requested [{s0}, {s0 + n}) of axis {d}, which has {total} elements"
            )
    if any(n == 0 for n in shape):
        return
    per_axis = []
    for s0, n, c in zip(start, shape, meta.chunks):
        per_axis.append(range(s0 // c, (s0 + n - 1) // c + 1))
    for index in itertools.product(*per_axis):
        src, dst = [], []
        for i, s0, n, c in zip(index, start, shape, meta.chunks):
            lo, hi = max(s0, i * c), min(s0 + n, (i + 1) * c)
            src.append(slice(lo - i * c, hi - i * c))
            dst.append(slice(lo - s0, hi - s0))
        yield tuple(index), tuple(src), tuple(dst)


def read_meta(files: CheckpointFiles, key: str) -> ZarrArrayMeta:
    try:
        raw = files.read_bytes(f"{key}/{ZARRAY}")
    except FileNotFoundError:
        raise ZarrFormatError(f"{files.location} has no zarr array {key}") from None
    return ZarrArrayMeta.parse(raw, key)


def open_chunk(files: CheckpointFiles, meta: ZarrArrayMeta, index: tuple[int, ...]) -> np.ndarray | None:
    """The chunk as a copy-on-write memory map of its full (padded) shape in the storage dtype, or None
    when the chunk file is missing. Nothing is read until the map is sliced and used."""
    rel = f"{meta.key}/{meta.chunk_name(index)}"
    if not files.is_file(rel):
        return None
    r = files.byte_range(rel)
    dt = meta.storage_dtype
    expected = int(np.prod(meta.chunks, dtype=np.int64)) * dt.itemsize
    if r.size != expected:
        raise ZarrFormatError(
            f"{files.location / rel}: {r.size} bytes; a {list(meta.chunks)} chunk of {meta.dtype} has {expected} "
            "(compressed or truncated chunk?)"
        )
    # mode "c": private mapping, so the result is writable (torch.from_numpy wants that) while the file never is.
    return np.memmap(r.path, dtype=dt, mode="c", offset=r.offset, shape=meta.chunks, order="C")


def list_arrays(files: CheckpointFiles) -> list[str]:
    """Keys of the zarr arrays directly under `files` (folders holding a `.zarray`)."""
    return [name for name in files.listdir() if files.is_file(f"{name}/{ZARRAY}")]


def fill_value_bits(meta: ZarrArrayMeta) -> np.uint16:
    """A bfloat16 array's fill value as its stored bit pattern (round to nearest even)."""
    bits = int(np.array(meta.fill_value, dtype="<f4").view("<u4"))
    return np.uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


def read_region(files: CheckpointFiles, meta: ZarrArrayMeta, start: tuple[int, ...], shape: tuple[int, ...]
                ) -> np.ndarray:
    """The box [start, start + shape) as a new numpy array in the storage dtype (tests and tools)."""
    out = np.empty(shape, dtype=meta.storage_dtype)
    for index, src, dst in chunk_overlaps(meta, start, shape):
        chunk = open_chunk(files, meta, index)
        if chunk is None:
            if meta.fill_value is None:
                raise ZarrFormatError(f"{files.location / meta.key}: chunk {meta.chunk_name(index)} is missing")
            out[dst] = fill_value_bits(meta) if meta.is_bfloat16 else meta.fill_value
        else:
            out[dst] = chunk[src]
            del chunk
    return out
