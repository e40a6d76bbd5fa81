"""Checks, before anything is deployed, that a checkpoint's weights can fill the model its config describes.

The workers would find the same problems only after Serve had placed them, and Serve retries a replica
whose constructor raises forever, so a checkpoint it cannot serve must fail in `serve_app.build_app`.

NeMo checkpoints: every tensor the reward model loads must be stored under the checkpoint's key prefix with
the global shape the architecture gives it (decoder layers stacked on a leading layer axis, megatron-core's
Transformer-Engine names, the layout `sharding.checkpoints.nemo_weights.load_weights` checks on every rank). HF checkpoints:
every safetensors file the index names must exist. No torch is imported for zarr weights; torch_dist
metadata is a torch pickle, so reading its shapes imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from configs.model import ModelArchConfig
from sharding.checkpoints.hf import HFCheckpoint
from sharding.checkpoints.nemo import CheckpointFormatError, NemoCheckpoint

MAX_LISTED_PROBLEMS = 8


def expected_tensor_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor the reward model loads, by name without the key prefix."""
    layers, hidden, ffn = arch.num_layers, arch.hidden_size, arch.ffn_hidden_size
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    fc1_rows = 2 * ffn if arch.activation == "swiglu" else ffn
    shapes: dict[str, tuple[int, ...]] = {
        "embedding.word_embeddings.weight": (arch.padded_vocab_size, hidden),
        "decoder.layers.self_attention.linear_qkv.weight": (layers, qkv_rows, hidden),
        "decoder.layers.self_attention.linear_proj.weight": (layers, hidden, arch.num_attention_heads * arch.head_dim),
        "decoder.layers.mlp.linear_fc1.weight": (layers, fc1_rows, hidden),
        "decoder.layers.mlp.linear_fc2.weight": (layers, hidden, ffn),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (layers, hidden),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (layers, hidden),
        "decoder.final_layernorm.weight": (hidden,),
        "rm_head.weight": (arch.num_attributes, hidden),
    }
    if arch.normalization != "rmsnorm":
        shapes["decoder.layers.self_attention.linear_qkv.layer_norm_bias"] = (layers, hidden)
        shapes["decoder.layers.mlp.linear_fc1.layer_norm_bias"] = (layers, hidden)
        shapes["decoder.final_layernorm.bias"] = (hidden,)
    if arch.bias:
        shapes["decoder.layers.self_attention.linear_qkv.bias"] = (layers, qkv_rows)
        shapes["decoder.layers.self_attention.linear_proj.bias"] = (layers, hidden)
        shapes["decoder.layers.mlp.linear_fc1.bias"] = (layers, fc1_rows)
        shapes["decoder.layers.mlp.linear_fc2.bias"] = (layers, hidden)
    if arch.rm_head_bias:
        shapes["rm_head.bias"] = (arch.num_attributes,)
    return shapes


def stored_tensor_shapes(checkpoint: NemoCheckpoint) -> dict[str, tuple[int, ...]]:
    """Global shape of every stored tensor, by full key (prefix included), from the backend's metadata."""
    fmt = checkpoint.weights_format
    files = checkpoint.weights_files
    if fmt.backend == "zarr":
        from sharding.checkpoints.zarr import list_arrays, read_meta

        return {key: tuple(read_meta(files, key).shape) for key in list_arrays(files)}
    from sharding.checkpoints.nemo_weights import tensor_infos  # torch_dist's index is a torch pickle

    return {key: tuple(info.shape) for key, info in tensor_infos(files, fmt).items()}


def check_weights_fit(checkpoint: NemoCheckpoint | HFCheckpoint, arch: ModelArchConfig) -> None:
    """Raises CheckpointFormatError naming what is missing or mis-shaped (at most 8 problems listed)."""
    if isinstance(checkpoint, HFCheckpoint):
        _check_hf_files(checkpoint.path)
        return
    try:
        fmt = checkpoint.weights_format
        stored = stored_tensor_shapes(checkpoint)
    except (OSError, ValueError) as e:  # CheckpointFormatError is a ValueError
        raise CheckpointFormatError(f"the weights of {checkpoint.path} are unreadable: {e}") from None
    prefix = fmt.key_prefix
    problems = []
    for name, shape in expected_tensor_shapes(arch).items():
        found = stored.get(prefix + name)
        if found is None:
            problems.append(f"missing {prefix + name}")
        elif found != shape:
            problems.append(f"{prefix + name} has shape {list(found)}, the model expects {list(shape)}")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise CheckpointFormatError(
            f"checkpoint {checkpoint.path} ({fmt.backend}, key prefix {prefix or '(none)'!r}) does not fit the "
            f"model of its model_config.yaml: {listed}" + (f"; and {more} more" if more > 0 else "")
        )


def _check_hf_files(root: Path) -> None:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in files if not (root / name).is_file()]
        if missing:
            raise CheckpointFormatError(f"{root}: {index.name} names files that do not exist: {', '.join(missing)}")
    elif not (root / "model.safetensors").is_file():
        raise CheckpointFormatError(f"{root} has neither model.safetensors nor model.safetensors.index.json")
