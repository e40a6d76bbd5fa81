"""What a megatron-core distributed checkpoint stores (`tensor_infos`), and the strategies that read it where
megatron-core 0.16 does not: zarr arrays, and torch_dist files inside a packed `.nemo`.

* zarr (the released Nemotron-4-340B-Reward): megatron-core 0.16 no longer reads it, so
  `ZarrLoadShardedStrategy` does: it intersects each requested slice with the array's chunk grid and
  copies the overlapping parts out of memory-mapped chunk files (bfloat16 chunks are read as 16-bit
  integers and reinterpreted), so a rank touches only the bytes of its slice.
* torch_dist: megatron-core's own strategy; inside a packed `.nemo` its files are read through a
  torch.distributed.checkpoint reader over the archive's byte ranges (`ArchiveTorchDistLoadStrategy`).
"""

from __future__ import annotations

import contextlib
import io
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import CheckpointingException, ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import LoadShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from sharding.checkpoints.files import CheckpointFiles, open_files
from sharding.checkpoints.nemo import CheckpointFormatError, WeightsFormat, read_weights_format
from sharding.checkpoints.zarr import ZarrArrayMeta, chunk_overlaps, list_arrays, open_chunk, read_meta

NUMPY_TO_NAME = {"float32": "float32", "float16": "float16", "float64": "float64", "int64": "int64",
                 "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: global shape (stacked layer axis included), dtype name, the distinct chunk
    shapes it is stored in, and its size."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def zarr_dtype_name(meta: ZarrArrayMeta) -> str:
    return "bfloat16" if meta.is_bfloat16 else NUMPY_TO_NAME.get(meta.storage_dtype.name, meta.storage_dtype.name)


def tensor_infos(files: CheckpointFiles, fmt: WeightsFormat | None = None) -> dict[str, TensorInfo]:
    """Every tensor the checkpoint stores (prefix included), from the backend's own metadata."""
    fmt = fmt or read_weights_format(files)
    out: dict[str, TensorInfo] = {}
    if fmt.backend == "zarr":
        for key in list_arrays(files):
            meta = read_meta(files, key)
            out[key] = TensorInfo(key, meta.shape, zarr_dtype_name(meta), (meta.chunks,))
    else:
        metadata = ArchiveFileSystemReader(files).read_metadata()
        for key, md in sorted(metadata.state_dict_metadata.items()):
            if isinstance(md, TensorStorageMetadata):
                chunks = tuple(sorted({tuple(c.sizes) for c in md.chunks}))
                out[key] = TensorInfo(key, tuple(md.size), str(md.properties.dtype).removeprefix("torch."), chunks)
    return out


# ------------------------------------------------------------------------------------- zarr strategy


@dataclass
class ReadStats:
    """What a zarr load touched: per key, the bytes copied out of chunk files and the chunk files opened."""

    bytes_by_key: dict[str, int] = field(default_factory=dict)
    chunks_opened: int = 0

    @property
    def bytes_read(self) -> int:
        return sum(self.bytes_by_key.values())


class ZarrLoadShardedStrategy(LoadShardedStrategy):
    """Loads ShardedTensors from zarr v2 arrays (megatron-core's removed zarr backend, format version 1).

    Usable as `dist_checkpointing.load(sharded_state_dict, dir, sharded_strategy=ZarrLoadShardedStrategy())`
    for a directory; `files` lets it read a packed `.nemo` too. Each ShardedTensor's data (the model's
    parameter when it has one) is filled in place; a ShardedTensor without data gets a new CPU tensor.
    """

    def __init__(self, files: CheckpointFiles | None = None):
        super().__init__()
        self.files = files
        self.stats = ReadStats()
        self._metas: dict[str, ZarrArrayMeta] = {}

    def check_backend_compatibility(self, loaded_backend):
        if loaded_backend != "zarr":
            raise CheckpointingException(f"ZarrLoadShardedStrategy cannot read backend {loaded_backend!r}")

    def check_version_compatibility(self, loaded_version):
        if int(loaded_version) != 1:
            raise CheckpointingException(f"zarr backend version {loaded_version} is not supported (only 1)")

    def _files(self, checkpoint_dir) -> CheckpointFiles:
        if self.files is None:
            self.files = open_files(checkpoint_dir)
        return self.files

    def _meta(self, files: CheckpointFiles, key: str) -> ZarrArrayMeta:
        if key not in self._metas:
            self._metas[key] = read_meta(files, key)
        return self._metas[key]

    def load(self, sharded_state_dict, checkpoint_dir):
        files = self._files(checkpoint_dir)

        def load_one(obj):
            if isinstance(obj, ShardedObject):
                raise CheckpointingException(f"{obj.key}: sharded objects are not read from zarr checkpoints")
            if not isinstance(obj, ShardedTensor):
                return obj
            return self._read(files, obj)

        with torch.no_grad():
            return dict_list_map_inplace(load_one, sharded_state_dict)

    def _read(self, files: CheckpointFiles, sh: ShardedTensor) -> torch.Tensor:
        if sh.flattened_range is not None:
            raise CheckpointingException(f"{sh.key}: flattened shards (optimizer state) are not supported")
        meta = self._meta(files, sh.key)
        if tuple(meta.shape) != tuple(sh.global_shape):
            raise CheckpointingException(
                f"{sh.key}: the checkpoint holds shape {list(meta.shape)}, the model expects {list(sh.global_shape)}"
            )
        target = sh.data if sh.data is not None else torch.empty(sh.local_shape, dtype=sh.dtype)
        view = target
        for _ in range(sh.prepend_axis_num):
            view = view.unsqueeze(0)  # the stacked layer axis (and any other prepended axis): size 1 here
        box = tuple(view.shape)
        copied = 0
        for index, src, dst in chunk_overlaps(meta, tuple(sh.global_offset), box):
            chunk = open_chunk(files, meta, index)
            self.stats.chunks_opened += 1
            if chunk is None:
                if meta.fill_value is None:
                    raise CheckpointingException(f"{files.location / sh.key}: chunk {meta.chunk_name(index)} is missing")
                view[dst].fill_(float(meta.fill_value))
                continue
            part = chunk[src]
            if meta.is_bfloat16:
                piece = torch.from_numpy(part.view(np.int16)).view(torch.bfloat16)
            else:
                if not part.dtype.isnative:
                    part = part.astype(part.dtype.newbyteorder("="))
                piece = torch.from_numpy(part)
            view[dst].copy_(piece)  # converts dtype; only the pages of `part` are read from disk
            copied += part.nbytes
            del piece, part, chunk  # unmap now: the next chunk must not pile up on this one
        self.stats.bytes_by_key[sh.key] = self.stats.bytes_by_key.get(sh.key, 0) + copied
        return target

    def load_tensors_metadata(self, checkpoint_dir):
        files = self._files(checkpoint_dir)
        out = {}
        for key, info in tensor_infos(files).items():
            out[key] = ShardedTensor.from_rank_offsets(
                key, torch.empty(info.shape, dtype=getattr(torch, info.dtype), device="meta")
            ).without_data()
        return out


# ------------------------------------------------------------------ torch_dist inside a packed .nemo


class _FilesFileSystem(FileSystemBase):
    """torch.distributed.checkpoint's file-system interface over CheckpointFiles (read-only)."""

    def __init__(self, files: CheckpointFiles):
        self.files = files

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        if mode not in ("rb", "r"):
            raise CheckpointFormatError(f"{self.files.location} is read-only here (mode {mode!r})")
        with self.files.open(str(path)) as stream:
            yield stream

    def concat_path(self, path, suffix: str):
        return posixpath.join(str(path), suffix) if str(path) else suffix

    def init_path(self, path):
        return str(path)

    def rename(self, path, new_path) -> None:
        raise CheckpointFormatError("read-only")

    def mkdir(self, path) -> None:
        raise CheckpointFormatError("read-only")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def exists(self, path) -> bool:
        return self.files.is_file(str(path)) or self.files.is_dir(str(path))

    def rm_file(self, path) -> None:
        raise CheckpointFormatError("read-only")


class ArchiveFileSystemReader(FileSystemReader):
    """A FileSystemReader whose files are CheckpointFiles (a directory or byte ranges of a packed .nemo).
    The metadata is read once and cached, like megatron-core's reader."""

    def __init__(self, files: CheckpointFiles):
        super().__init__(path="")
        self.fs = _FilesFileSystem(files)
        self.path = ""
        self._cached_metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._cached_metadata is None:
            self._cached_metadata = super().read_metadata(*args, **kwargs)
        return self._cached_metadata


class ArchiveTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load, reading through ArchiveFileSystemReader."""

    def __init__(self, files: CheckpointFiles):
        super().__init__()
        self.files = files

    def load(self, sharded_state_dict, checkpoint_dir):
        from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

        # megatron-core builds its reader with this module-level function; swap it for the call's duration.
        original = getattr(mcore_torch, "_get_filesystem_reader", None)
        if original is None:
            raise RuntimeError("megatron.core.dist_checkpointing.strategies.torch._get_filesystem_reader is gone")
        reader = ArchiveFileSystemReader(self.files)
        mcore_torch._get_filesystem_reader = lambda *args, **kwargs: reader
        try:
            return super().load(sharded_state_dict, checkpoint_dir)
        finally:
            mcore_torch._get_filesystem_reader = original
