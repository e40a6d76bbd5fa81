"""Loads (and writes) `model_weights/`: a megatron-core distributed checkpoint in the zarr or torch_dist
backend, in a directory or inside a packed `.nemo`, with the key prefix `model.` (NeMo 1), `module.`
(NeMo 2) or none (Megatron-LM).

Every rank describes its own slice through its model's sharded state dict (Transformer-Engine key names,
decoder layers stacked on a leading layer axis) and reads only that, straight into the model's parameters:
a checkpoint saved at any TP/PP loads at any other. Loading is collective: every rank of the world calls
`load_weights` together.

zarr is read by `sharding.checkpoints.dist_readers.ZarrLoadShardedStrategy` (megatron-core 0.16 no longer
reads it), torch_dist by megatron-core's own strategy (inside a packed `.nemo`, through
`dist_readers.ArchiveTorchDistLoadStrategy`).

`_extra_state` entries are never requested (TE's stored objects do not unpickle under weights-only loading
and a reward forward needs none), `common.pt` is not read (nothing in it is needed), and the LM
`output_layer` is never read because the reward model does not build one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import merge, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
from megatron.core.dist_checkpointing.strategies.base import LoadShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from megatron.core.dist_checkpointing.utils import extract_sharded_base
from megatron.core.dist_checkpointing.validation import (
    StrictHandling,
    determine_global_metadata,
    validate_integrity_and_strict_load,
)

from sharding.checkpoints.dist_readers import (
    ArchiveTorchDistLoadStrategy,
    ReadStats,
    TensorInfo,
    ZarrLoadShardedStrategy,
    tensor_infos,
    zarr_dtype_name,
)
from sharding.checkpoints.files import CheckpointFiles, DirectoryFiles, open_files
from sharding.checkpoints.nemo import CheckpointFormatError, WeightsFormat, read_weights_format
from sharding.checkpoints.zarr import read_meta

NEMO_KEY_PREFIX = "model."
COMMON_FILE = "common.pt"
EXTRA_STATE = "_extra_state"


def sharded_state_dict(model: torch.nn.Module, prefix: str = NEMO_KEY_PREFIX) -> dict:
    """The model's sharded state dict under `prefix`, without `_extra_state` entries."""
    sd = model.sharded_state_dict(prefix=prefix)
    # Transformer-Engine extra state: local layers ask for entries old checkpoints lack, and TE's stored
    # objects fail to unpickle under weights-only loading. A reward forward needs none of it.
    return {k: v for k, v in sd.items() if not k.endswith(EXTRA_STATE)}


def save_weights(model: torch.nn.Module, weights_dir: Path, prefix: str = NEMO_KEY_PREFIX) -> None:
    """torch_dist, as megatron-core writes it today. Collective."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict(model, prefix), str(weights_dir))


# --------------------------------------------------------------------------------------------- tensors


# --------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    location: str
    backend: str
    key_prefix: str
    tensors: int
    zarr_stats: ReadStats | None = None


def _agree(error: str | None) -> None:
    """Every rank raises if any rank found a problem, before anyone enters a collective that would hang."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    found = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if found:
        raise CheckpointFormatError("; ".join(found))


def _check_against_checkpoint(sharded: dict, infos: dict[str, TensorInfo], fmt: WeightsFormat, where) -> str | None:
    problems = []
    seen: set[str] = set()
    for sh in nested_values(sharded):
        if not isinstance(sh, ShardedTensor) or sh.key in seen:
            continue
        seen.add(sh.key)
        info = infos.get(sh.key)
        if info is None:
            problems.append(f"missing {sh.key}")
        elif tuple(info.shape) != tuple(sh.global_shape):
            problems.append(f"{sh.key} has shape {list(info.shape)}, the model expects {list(sh.global_shape)}")
    if not problems:
        return None
    return (f"checkpoint {where} ({fmt.backend}, key prefix {fmt.key_prefix or '(none)'!r}) does not fit the model: "
            + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def _needed_infos(files: CheckpointFiles, fmt: WeightsFormat, sharded: dict) -> dict[str, TensorInfo]:
    if fmt.backend == "torch_dist":
        return tensor_infos(files, fmt)
    out = {}
    for sh in nested_values(sharded):  # zarr: read only the .zarray files this rank needs
        if isinstance(sh, ShardedTensor) and sh.key not in out and fmt.has(sh.key[len(fmt.key_prefix):]):
            meta = read_meta(files, sh.key)
            out[sh.key] = TensorInfo(sh.key, meta.shape, zarr_dtype_name(meta), (meta.chunks,))
    return out


def load_sharded(sharded: dict, strategy: LoadShardedStrategy, files: CheckpointFiles, alone: bool = False) -> dict:
    """`dist_checkpointing.load` without its directory checks and without `common.pt`: factories,
    sharding-integrity validation (collective), then the strategy. Works for packed checkpoints.
    `alone`: this rank reads its slice with no collective at all (a rank restarted alone while its peers keep
    their weights, `sharding.restart`): no sharding-integrity exchange, and torch's checkpoint reader plans
    this rank's reads by itself."""
    sharded, nonpersistent, factories = load_preprocess(sharded)
    sharded, _ = extract_sharded_base(sharded)
    if alone:
        local_md = [ten.without_data() for ten in nested_values(sharded)]
        sharded, _, _ = validate_integrity_and_strict_load(
            sharded, StrictHandling.ASSUME_OK_UNEXPECTED, False, local_md, None, None)
        with _reader_without_collectives():
            loaded = strategy.load(sharded, files.location)
    else:
        local_md, global_md = determine_global_metadata(sharded)
        sharded, _, _ = validate_integrity_and_strict_load(
            sharded, StrictHandling.ASSUME_OK_UNEXPECTED, True, local_md, global_md, None
        )
        loaded = strategy.load(sharded, files.location)
    merge(loaded, nonpersistent)
    return apply_factory_merges(loaded, factories)


@contextlib.contextmanager
def _reader_without_collectives():
    """megatron-core's torch_dist load calls `torch.distributed.checkpoint.load_state_dict` through its module
    attribute `checkpoint`; for the call's duration it gets `no_dist=True` (this rank plans its own reads)."""
    import functools
    import types

    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    original = getattr(mcore_torch, "checkpoint", None)
    if original is None or not hasattr(original, "load_state_dict"):
        raise RuntimeError("megatron.core.dist_checkpointing.strategies.torch.checkpoint.load_state_dict is gone")
    mcore_torch.checkpoint = types.SimpleNamespace(
        load_state_dict=functools.partial(original.load_state_dict, no_dist=True))
    try:
        yield
    finally:
        mcore_torch.checkpoint = original


def load_weights(model: torch.nn.Module, weights_dir: str | Path, alone: bool = False) -> LoadReport:
    """Fills `model` (this rank's stage and TP slice) from the distributed checkpoint at `weights_dir`,
    which may be a folder inside a packed `.nemo` (`/x/model.nemo/model_weights`). Collective, unless `alone`
    (`load_sharded`)."""
    files = open_files(weights_dir)
    fmt = read_weights_format(files)
    sharded = sharded_state_dict(model, prefix=fmt.key_prefix)
    try:
        problem = _check_against_checkpoint(sharded, _needed_infos(files, fmt, sharded), fmt, files.location)
    except (CheckpointFormatError, ValueError, OSError) as e:
        problem = f"{type(e).__name__}: {e}"
    if alone:
        if problem:
            raise CheckpointFormatError(problem)
    else:
        _agree(problem)

    stats = None
    if fmt.backend == "zarr":
        strategy: LoadShardedStrategy = ZarrLoadShardedStrategy(files)
        stats = strategy.stats
    elif isinstance(files, DirectoryFiles):
        strategy = TorchDistLoadShardedStrategy()
    else:
        strategy = ArchiveTorchDistLoadStrategy(files)
    loaded = load_sharded(sharded, strategy, files, alone=alone)

    prefix = fmt.key_prefix
    state = {k[len(prefix):]: v for k, v in loaded.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(EXTRA_STATE)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {files.location} did not fill the model: missing {missing}, unexpected {unexpected}")
    return LoadReport(str(files.location), fmt.backend, prefix, len(state), stats)


__all__ = ["LoadReport", "load_sharded", "load_weights", "save_weights", "sharded_state_dict"]
