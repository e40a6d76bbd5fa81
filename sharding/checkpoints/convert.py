"""zarr -> torch_dist conversion, one chunk at a time (`python -m sharding.checkpoints convert`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from sharding.checkpoints.nemo_weights import COMMON_FILE
from sharding.checkpoints.files import CheckpointFiles
from sharding.checkpoints.nemo import METADATA_FILE, CheckpointFormatError, read_weights_format
from sharding.checkpoints.zarr import ZarrArrayMeta, open_chunk, read_meta


def _zarr_chunk_tensor(files: CheckpointFiles, meta: ZarrArrayMeta, index: tuple[int, ...]) -> torch.Tensor:
    """One chunk, cropped to the array's bounds, as a new tensor of its own (torch.save writes its storage)."""
    sizes = tuple(min(c, s - i * c) for i, c, s in zip(index, meta.chunks, meta.shape))
    crop = tuple(slice(0, n) for n in sizes)
    chunk = open_chunk(files, meta, index)
    if chunk is None:
        if meta.fill_value is None:
            raise CheckpointFormatError(f"{files.location / meta.key}: chunk {meta.chunk_name(index)} is missing")
        dtype = torch.bfloat16 if meta.is_bfloat16 else torch.from_numpy(np.empty(0, meta.storage_dtype)).dtype
        return torch.full(sizes, float(meta.fill_value), dtype=dtype)
    arr = np.ascontiguousarray(chunk[crop])
    del chunk
    if meta.is_bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(arr)


def convert_zarr_to_torch_dist(src: CheckpointFiles, out_dir: Path, *, drop_output_layer: bool = False,
                               progress=None) -> dict:
    """Writes the zarr checkpoint `src` as torch_dist in `out_dir`, one chunk at a time (memory: one chunk).

    Each zarr chunk becomes one torch.distributed.checkpoint chunk of the same global tensor, so the
    result keeps the saved TP layout (a TP 8 save stays 8 pieces per tensor, and any rank later reads only
    the pieces its slice touches). `_extra_state` objects are not carried over (no reader needs them);
    `common.pt` is copied as is. No process group is needed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    fmt = read_weights_format(src)
    if fmt.backend != "zarr":
        raise CheckpointFormatError(f"{src.location} is {fmt.backend}, not zarr")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)

    items: list[WriteItem] = []
    sources: dict[tuple[str, tuple[int, ...]], tuple[ZarrArrayMeta, tuple[int, ...]]] = {}
    skipped = []
    for key in sorted(fmt.keys):
        if drop_output_layer and key == f"{fmt.key_prefix}output_layer.weight":
            skipped.append(key)
            continue
        meta = read_meta(src, key)
        dtype = torch.bfloat16 if meta.is_bfloat16 else torch.from_numpy(
            np.empty(0, meta.storage_dtype.newbyteorder("="))).dtype
        for index in itertools.product(*(range(g) for g in meta.grid)):
            offsets = tuple(i * c for i, c in zip(index, meta.chunks))
            sizes = tuple(min(c, s - o) for c, s, o in zip(meta.chunks, meta.shape, offsets))
            items.append(WriteItem(
                index=MetadataIndex(key, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=dtype),
                    size=torch.Size(meta.shape),
                ),
            ))
            sources[(key, offsets)] = (meta, index)

    class StreamingPlanner(DefaultSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.done = 0

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item: WriteItem):
            meta, index = sources[(write_item.index.fqn, tuple(write_item.index.offset))]
            self.done += 1
            if progress is not None:
                progress(self.done, len(items), write_item.index.fqn)
            return _zarr_chunk_tensor(src, meta, index)

    writer = dcp.FileSystemWriter(str(out_dir), single_file_per_rank=True, thread_count=1, sync_files=False)
    dcp.save({}, storage_writer=writer, planner=StreamingPlanner(), no_dist=True)
    (out_dir / METADATA_FILE).write_text(json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
         "common_backend": "torch", "common_backend_version": 1}))
    if src.is_file(COMMON_FILE):
        (out_dir / COMMON_FILE).write_bytes(src.read_bytes(COMMON_FILE))
    else:
        torch.save({}, out_dir / COMMON_FILE)
    return {"tensors": len(fmt.keys) - len(skipped), "chunks": len(items), "skipped": skipped,
            "key_prefix": fmt.key_prefix}
