"""Writes tiny checkpoints in every layout the service reads, from one set of reference weights.

* `write_zarr_weights`: the released Nemotron-4-340B-Reward layout, written from its description
  (the released checkpoint's layout as published) rather than with the project's reader code: one zarr v2 array per tensor with
  the `.zarray` fields megatron-core's zarr backend wrote (zarr-python formatting), raw little-endian C-order
  chunks without compression, chunk shape = the shard of a TP 8 save (column-parallel weights split on
  dim 0 of the per-layer matrix, row-parallel ones on dim 1, embeddings and the LM output layer on the vocab
  dim, the reward head on its input dim, layernorms whole), every decoder tensor stacked on a leading layer
  axis (chunk 1 along it), Transformer-Engine names, `<module>._extra_state/shard_<layer>_<num_layers>.pt`
  files holding pickled TE-style objects (not loadable with weights_only), a stored
  `output_layer.weight`, `metadata.json` naming the zarr backend and an empty `common.pt`.
* `write_torch_dist_weights`: megatron-core's own torch_dist save of a TP1 model holding the same values.
* `pack_nemo`: a packed `.nemo` (uncompressed tar, members under `./`).
* `write_model_config` / `nemotron_model_config`: `model_config.yaml` with the key names NeMo writes for
  Nemotron-4-340B-Reward (training config merged with NeMo-Aligner's reward-model keys), at a tiny shape,
  and a tokenizer stored as `<32 hex>_nemotron_2_256k.model`.

Reference weights are float32 values that bfloat16 represents exactly, so a bf16 zarr copy and a float32
torch_dist copy hold the same numbers.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

# Heads and query groups divisible by 8, so a TP 8 save of this shape could exist: each qkv chunk of 64
# rows is exactly one query group (2 query heads, 1 key, 1 value head of 16).
TINY_SHAPE = {"num_layers": 4, "hidden_size": 256, "ffn_hidden_size": 1024, "num_attention_heads": 16,
              "num_query_groups": 8}
SAVE_TP = 8
NUM_ATTRIBUTES = 9
TOKENIZER_BASENAME = "nemotron_2_256k.model"

# How a TP save splits each per-layer matrix (axis of the unstacked tensor; None = every rank holds it all).
TP_SPLIT_AXIS: dict[str, int | None] = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "decoder.layers.self_attention.linear_qkv.weight": 0,  # column-parallel
    "decoder.layers.self_attention.linear_proj.weight": 1,  # row-parallel
    "decoder.layers.mlp.linear_fc1.weight": 0,  # column-parallel
    "decoder.layers.mlp.linear_fc2.weight": 1,  # row-parallel
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": None,
    "decoder.layers.self_attention.linear_qkv.layer_norm_bias": None,
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": None,
    "decoder.layers.mlp.linear_fc1.layer_norm_bias": None,
    "decoder.final_layernorm.weight": None,
    "decoder.final_layernorm.bias": None,
    "rm_head.weight": 1,  # row-parallel: its input (hidden) dim
    "rm_head.bias": None,
}
TE_MODULES_WITH_EXTRA_STATE = ("self_attention.core_attention", "self_attention.linear_qkv",
                               "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


# ------------------------------------------------------------------------------------------ weights


def reference_shapes(shape: dict[str, int], vocab: int, num_attributes: int = NUM_ATTRIBUTES,
                     rm_head_bias: bool = True) -> dict[str, tuple[int, ...]]:
    """Global shapes of every stored tensor (no prefix), decoder tensors stacked on the layer axis."""
    layers, hidden, ffn = shape["num_layers"], shape["hidden_size"], shape["ffn_hidden_size"]
    heads, groups = shape["num_attention_heads"], shape["num_query_groups"]
    head_dim = shape.get("kv_channels") or hidden // heads
    out = {
        "embedding.word_embeddings.weight": (vocab, hidden),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (layers, hidden),
        "decoder.layers.self_attention.linear_qkv.layer_norm_bias": (layers, hidden),
        "decoder.layers.self_attention.linear_qkv.weight": (layers, (heads + 2 * groups) * head_dim, hidden),
        "decoder.layers.self_attention.linear_proj.weight": (layers, hidden, heads * head_dim),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (layers, hidden),
        "decoder.layers.mlp.linear_fc1.layer_norm_bias": (layers, hidden),
        "decoder.layers.mlp.linear_fc1.weight": (layers, ffn, hidden),
        "decoder.layers.mlp.linear_fc2.weight": (layers, hidden, ffn),
        "decoder.final_layernorm.weight": (hidden,),
        "decoder.final_layernorm.bias": (hidden,),
        "output_layer.weight": (vocab, hidden),
        "rm_head.weight": (num_attributes, hidden),
    }
    if rm_head_bias:
        out["rm_head.bias"] = (num_attributes,)
    return out


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def reference_weights(shape: dict[str, int], vocab: int, seed: int = 0, num_attributes: int = NUM_ATTRIBUTES,
                      rm_head_bias: bool = True) -> dict[str, torch.Tensor]:
    """Random float32 weights that bfloat16 represents exactly; norms get non-trivial gamma and beta."""
    gen = torch.Generator().manual_seed(seed)
    hidden = shape["hidden_size"]
    out = {}
    for key, shp in reference_shapes(shape, vocab, num_attributes, rm_head_bias).items():
        std = 1.0 / hidden**0.5 if key.startswith("rm_head") else 0.1 if "norm" in key else 0.02
        out[key] = bf16_exact(torch.randn(shp, generator=gen) * std)
    return out


def tp_chunks(key: str, shape: tuple[int, ...], tp: int = SAVE_TP) -> tuple[int, ...]:
    """Chunk shape of a TP `tp` save: the saving rank's shard, 1 along the stacked layer axis."""
    stacked = key.startswith("decoder.layers.")
    axis = TP_SPLIT_AXIS[key]
    chunks = list(shape)
    if stacked:
        chunks[0] = 1
    if axis is not None:
        full_axis = axis + (1 if stacked else 0)
        if shape[full_axis] % tp:
            raise ValueError(f"{key}: axis {full_axis} of {shape} is not divisible by TP {tp}")
        chunks[full_axis] = shape[full_axis] // tp
    return tuple(chunks)


# ------------------------------------------------------------------------------------------------ zarr


def zarray_text(shape, chunks, dtype: str) -> str:
    # zarr-python v2's own formatting of .zarray (indent 4, sorted keys).
    meta = {"chunks": list(chunks), "compressor": None, "dtype": dtype, "fill_value": None, "filters": None,
            "order": "C", "shape": list(shape), "zarr_format": 2}
    return json.dumps(meta, indent=4, sort_keys=True, separators=(",", ": "))


def _to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("<u2")
    return t.to({"<f4": torch.float32, "<f2": torch.float16}[dtype]).contiguous().numpy().astype(dtype)


def write_zarr_array(array_dir: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str,
                     chunk_fn: Callable[[tuple[slice, ...]], np.ndarray]) -> None:
    """One zarr v2 array; `chunk_fn(box)` returns the values of a box of the array in storage dtype.
    Edge chunks are padded with zeros to the full chunk shape, as zarr stores them."""
    array_dir.mkdir(parents=True, exist_ok=True)
    (array_dir / ".zarray").write_text(zarray_text(shape, chunks, dtype))
    grid = [range(-(-s // c)) for s, c in zip(shape, chunks)]
    for index in itertools.product(*grid):
        box = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))
        values = np.asarray(chunk_fn(box))
        if values.shape != tuple(chunks):
            padded = np.zeros(chunks, dtype=values.dtype)
            padded[tuple(slice(0, n) for n in values.shape)] = values
            values = padded
        little = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
        (array_dir / ".".join(map(str, index))).write_bytes(little.tobytes(order="C"))


def write_zarr_weights(weights_dir: Path, tensors: dict[str, torch.Tensor], num_layers: int,
                       prefix: str = "model.", dtype: str = "bfloat16", save_tp: int = SAVE_TP,
                       extra_state: bool = True) -> Path:
    weights_dir.mkdir(parents=True, exist_ok=True)
    for key, tensor in tensors.items():
        storage = _to_storage(tensor, dtype)
        write_zarr_array(weights_dir / f"{prefix}{key}", tuple(tensor.shape), tp_chunks(key, tuple(tensor.shape), save_tp),
                         dtype, lambda box, s=storage: s[box])
    if extra_state:
        write_extra_state(weights_dir, num_layers, prefix)
    write_backend_files(weights_dir, "zarr")
    return weights_dir


class RecipeStandIn:
    """Stands in for the Transformer-Engine recipe object TE pickles into its extra state: a class that
    torch.load(weights_only=True) refuses, as it refuses TE's."""

    def __init__(self, margin: int = 0, amax_history_len: int = 1024):
        self.margin = margin
        self.amax_history_len = amax_history_len


def write_extra_state(weights_dir: Path, num_layers: int, prefix: str = "model.") -> None:
    for module in TE_MODULES_WITH_EXTRA_STATE:
        folder = weights_dir / f"{prefix}decoder.layers.{module}._extra_state"
        folder.mkdir(parents=True, exist_ok=True)
        for layer in range(num_layers):
            state = {"recipe": RecipeStandIn(), "scale_fwd": torch.ones(3), "extra_fp8_variables": {}}
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            torch.save(buffer, folder / f"shard_{layer}_{num_layers}.pt")


def write_backend_files(weights_dir: Path, backend: str) -> None:
    (weights_dir / "metadata.json").write_text(json.dumps(
        {"sharded_backend": backend, "sharded_backend_version": 1, "common_backend": "torch",
         "common_backend_version": 1}))
    if not (weights_dir / "common.pt").exists():
        torch.save({}, weights_dir / "common.pt")


# ----------------------------------------------------------------------------------------- torch_dist


def write_torch_dist_weights(weights_dir: Path, tensors: dict[str, torch.Tensor], checkpoint_dir: Path,
                             prefix: str = "model.") -> Path:
    """megatron-core's torch_dist save of a TP1 model holding `tensors` (the model's config comes from
    `checkpoint_dir`'s model_config.yaml). Joins and leaves a one-rank process group of its own."""
    from configs.service import RuntimeConfig
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from sharding.checkpoints.nemo_weights import save_weights, sharded_state_dict
    from sharding.model import build_stage_model
    from sharding.checkpoints.nemo import NemoCheckpoint
    from sharding.process_group import destroy_model_parallel, free_port, init_model_parallel

    arch = NemoCheckpoint.open(checkpoint_dir).arch.model_copy(update={"rm_head_bias": "rm_head.bias" in tensors})
    runtime = RuntimeConfig()
    init_model_parallel(runtime, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), tp=1, pp=1)
    try:
        model = build_stage_model(arch, runtime, tp=1, pp=1, pp_rank=0)
        with torch.no_grad():
            for sh in sharded_state_dict(model, prefix="").values():
                if isinstance(sh, ShardedTensor):
                    full = tensors[sh.key]
                    index = tuple(slice(o, o + 1) for o in sh.global_offset[: sh.prepend_axis_num])
                    sh.data.copy_(full[index].reshape(sh.data.shape))
        save_weights(model, weights_dir, prefix=prefix)
    finally:
        destroy_model_parallel()
    return weights_dir


# -------------------------------------------------------------------------------- config + tokenizer


def write_tokenizer(folder: Path) -> str:
    """Trains the demo SentencePiece model and stores it NeMo-style as `<md5>_nemotron_2_256k.model`."""
    from demo.tokenizer import train_demo_tokenizer

    tmp = train_demo_tokenizer(folder / ".tokenizer.tmp")
    name = f"{hashlib.md5(tmp.read_bytes()).hexdigest()}_{TOKENIZER_BASENAME}"
    tmp.rename(folder / name)
    return name


def nemotron_model_config(tokenizer_file: str, shape: dict[str, int], save_tp: int = SAVE_TP, save_pp: int = 2
                          ) -> dict:
    """model_config.yaml of a Nemotron-4 reward model as NeMo-Aligner saves it: the base model's training
    keys (NeMo-Framework-Launcher's nemotron_340b), resolved, plus the reward-model keys. Tiny shape."""
    return {
        "mcore_gpt": True,
        "micro_batch_size": 1,
        "global_batch_size": 64,
        "rampup_batch_size": None,
        "context_parallel_size": 1,
        "tensor_model_parallel_size": save_tp,
        "pipeline_model_parallel_size": save_pp,
        "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": 4096,
        "max_position_embeddings": 4096,
        "num_layers": shape["num_layers"],
        "hidden_size": shape["hidden_size"],
        "ffn_hidden_size": shape["ffn_hidden_size"],
        "num_attention_heads": shape["num_attention_heads"],
        "init_method_std": 0.0063,
        "use_scaled_init_method": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "ffn_dropout": 0.0,
        "kv_channels": None,
        "apply_query_key_layer_scaling": True,
        "normalization": "layernorm1p",
        "layernorm_zero_centered_gamma": True,
        "layernorm_epsilon": 1.0e-05,
        "do_layer_norm_weight_decay": False,
        "make_vocab_size_divisible_by": 128,
        "pre_process": True,
        "post_process": True,
        "persist_layer_norm": True,
        "bias": False,
        "activation": "squared-relu",
        "headscale": False,
        "transformer_block_type": "pre_ln",
        "openai_gelu": False,
        "normalize_attention_scores": True,
        "position_embedding_type": "rope",
        "rotary_percentage": 0.5,
        "attention_type": "multihead",
        "share_embeddings_and_output_weights": False,
        "tokenizer": {
            "library": "sentencepiece",
            "type": None,
            "model": f"nemo:{tokenizer_file}",
            "delimiter": None,
            "vocab_file": None,
            "merge_file": None,
            "sentencepiece_legacy": False,
        },
        "native_amp_init_scale": 4294967296,
        "native_amp_growth_interval": 1000,
        "hysteresis": 2,
        "fp32_residual_connection": False,
        "fp16_lm_cross_entropy": False,
        "megatron_amp_O2": True,
        "grad_allreduce_chunk_size_mb": 125,
        "grad_div_ar_fusion": True,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_add_fusion": False,
        "masked_softmax_fusion": True,
        "seed": 1234,
        "resume_from_checkpoint": None,
        "use_cpu_initialization": False,
        "onnx_safe": False,
        "apex_transformer_log_level": 30,
        "gradient_as_bucket_view": True,
        "sync_batch_comm": False,
        "activations_checkpoint_granularity": None,
        "activations_checkpoint_method": None,
        "activations_checkpoint_num_layers": None,
        "num_micro_batches_with_partial_activation_checkpoints": None,
        "activations_checkpoint_layers_per_pipeline": None,
        "sequence_parallel": False,
        "overlap_p2p_comm": False,
        "batch_p2p_comm": True,
        "num_query_groups": shape["num_query_groups"],
        "transformer_engine": True,
        "fp8": False,
        "fp8_e4m3": False,
        "fp8_hybrid": True,
        "fp8_margin": 0,
        "fp8_interval": 1,
        "fp8_amax_history_len": 1024,
        "fp8_amax_compute_algo": "max",
        "fp8_wgrad": True,
        "optim": {"name": "distributed_fused_adam", "lr": 3.0e-06, "weight_decay": 0.1,
                  "betas": [0.9, 0.98], "sched": {"name": "CosineAnnealing", "warmup_steps": 10,
                                                  "constant_steps": 0, "min_lr": 3.0e-07}},
        "data": {"data_impl": "jsonl", "splits_string": None, "seq_length": 4096, "skip_warmup": True,
                 "num_workers": 2, "dataloader_type": "single", "reset_position_ids": False,
                 "reset_attention_mask": False, "eod_mask_loss": False, "index_mapping_dir": None,
                 "data_prefix": None},
        "precision": "bf16",
        "reward_model_type": "regression",
        "regression": {"num_attributes": NUM_ATTRIBUTES, "merge_attributes": False, "attribute_weights": None,
                       "loss_mask_val": -100},
        "output_sequence": False,
        "use_avg_pool": False,
        "force_head_dtype": "float32",
        "target": "nemo_aligner.models.nlp.gpt.megatron_gpt_regression_reward_model.MegatronGPTRegressionRewardModel",
        "nemo_version": "1.23.0rc0",
    }


def write_model_config(folder: Path, config: dict) -> None:
    (folder / "model_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def padded_vocab(tokenizer_size: int, save_tp: int = SAVE_TP, divisible_by: int = 128) -> int:
    multiple = divisible_by * save_tp
    return -(-tokenizer_size // multiple) * multiple


# ------------------------------------------------------------------------------------------- packing


def pack_nemo(folder: Path, tar_path: Path) -> Path:
    """A packed .nemo: an uncompressed tar of the folder, members under `./`."""
    with tarfile.open(tar_path, "w:") as tar:
        tar.add(folder, arcname=".")
    return tar_path


# -------------------------------------------------------------------------------------- checkpoints


def write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], shape: dict[str, int], *, backend: str,
                     prefix: str = "model.", packed: bool = False, tokenizer_from: Path | None = None,
                     config_overrides: dict | None = None, zarr_dtype: str = "bfloat16") -> Path:
    """A complete checkpoint (config, tokenizer, weights) at `out` (a folder, or a `.nemo` file if packed)."""
    folder = out.with_suffix(".staging") if packed else out
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if tokenizer_from is not None:
        name = next(p.name for p in tokenizer_from.iterdir() if p.name.endswith(TOKENIZER_BASENAME))
        shutil.copy(tokenizer_from / name, folder / name)
    else:
        name = write_tokenizer(folder)
    config = nemotron_model_config(name, shape)
    config.update(config_overrides or {})
    write_model_config(folder, config)
    weights_dir = folder / "model_weights"
    if backend == "zarr":
        write_zarr_weights(weights_dir, tensors, shape["num_layers"], prefix=prefix, dtype=zarr_dtype)
    elif backend == "torch_dist":
        write_torch_dist_weights(weights_dir, tensors, folder, prefix=prefix)
    else:
        raise ValueError(backend)
    if packed:
        pack_nemo(folder, out)
        shutil.rmtree(folder)
    return out
