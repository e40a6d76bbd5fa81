"""Reads a NeMo checkpoint: an extracted `.nemo` directory or a packed `.nemo` (an uncompressed tar of it).

    model_config.yaml                     -> the model config (`arch`)
    <32 hex>_<tokenizer>.model            -> referenced from the yaml as `nemo:<file>` (`tokenizer_path`)
    model_weights/                        -> megatron-core distributed checkpoint, zarr or torch_dist
                                             (`weights_dir`, `weights_files`, `weights_format`)

A packed `.nemo` is never extracted: the yaml and the weights' metadata are read from the archive, the
weight chunks are memory-mapped out of it by the loaders (`sharding.checkpoints.files`), and only the small
tokenizer file is copied to a cache folder, because SentencePiece wants a path.

The format's entry in the registry (`FORMAT`, `sharding.checkpoints.formats`): detection (the fallback: its
`open` names what is missing), the architecture from `model_config.yaml` (`arch_from_nemo_config`), the
weights check before anything is deployed (`check_weights_fit`) and the load (`nemo_weights.load_weights`).

No torch here (torch_dist's index is a torch pickle: its shapes are read with torch, imported then): the
router uses this module for the tokenizer and the architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import sentencepiece as spm
import yaml

from configs.model import ModelArchConfig, TokenizerRef
from configs.service import ATTRIBUTE_NAMES
from sharding.checkpoints.base import CheckpointFormat, CheckpointFormatError
from sharding.checkpoints.files import CheckpointFiles, DirectoryFiles, TarFiles
from sharding.checkpoints.zarr import list_arrays

CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
WEIGHTS_DIRS = (WEIGHTS_DIR, "weights")  # NeMo 1 .nemo; NeMo 2 keeps its distributed checkpoint in weights/
NEMO_PREFIX = "nemo:"
METADATA_FILE = "metadata.json"  # megatron-core: which backend wrote the distributed checkpoint
TORCH_DIST_METADATA = ".metadata"  # torch.distributed.checkpoint's pickled index
BACKENDS = ("zarr", "torch_dist")
# NeMo 1 (`model.`), NeMo 2 (`module.`), Megatron-LM (no prefix). Tried in this order.
KEY_PREFIXES = ("model.", "module.", "")
CACHE_ENV = "REWARD_SERVE_CACHE_DIR"


@dataclass(frozen=True)
class WeightsFormat:
    """What `model_weights/` holds: backend, key prefix and the tensor keys (with the prefix)."""

    backend: str  # "zarr" or "torch_dist"
    version: int
    key_prefix: str
    keys: frozenset[str] = field(repr=False)

    def has(self, key: str) -> bool:
        """Whether the checkpoint holds tensor `key` (prefix excluded)."""
        return f"{self.key_prefix}{key}" in self.keys


def read_weights_format(files: CheckpointFiles) -> WeightsFormat:
    """Backend from `metadata.json`, keys from the backend's own index, prefix from the keys."""
    if not files.is_file(METADATA_FILE):
        raise CheckpointFormatError(
            f"{files.location} has no {METADATA_FILE}: not a megatron-core distributed checkpoint"
        )
    try:
        meta = json.loads(files.read_bytes(METADATA_FILE))
        backend, version = str(meta["sharded_backend"]), int(meta.get("sharded_backend_version", 1))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{files.location / METADATA_FILE} is unreadable: {e!r}") from None
    if backend == "zarr":
        keys = frozenset(list_arrays(files))
    elif backend == "torch_dist":
        if not files.is_file(TORCH_DIST_METADATA):
            raise CheckpointFormatError(f"{files.location} is torch_dist but has no {TORCH_DIST_METADATA}")
        keys = frozenset(_pickle_strings(files.read_bytes(TORCH_DIST_METADATA)))
    else:
        raise CheckpointFormatError(
            f"{files.location}: sharded_backend {backend!r} is not supported (supported: {', '.join(BACKENDS)})"
        )
    return WeightsFormat(backend, version, detect_key_prefix(keys, files.location), keys)


def detect_key_prefix(keys: frozenset[str] | set[str], where: Any = "checkpoint") -> str:
    for prefix in KEY_PREFIXES:
        if any(k.startswith(f"{prefix}decoder.") or k == f"{prefix}embedding.word_embeddings.weight" for k in keys):
            return prefix
    sample = sorted(k for k in keys if "." in k)[:5]
    raise CheckpointFormatError(
        f"{where}: no GPT decoder keys under any of the prefixes {[p or '(none)' for p in KEY_PREFIXES]} "
        f"(first keys: {sample})"
    )


def _pickle_strings(data: bytes) -> set[str]:
    """Every string constant of a pickle, read without unpickling it (no torch, nothing executed): the
    tensor keys of a torch.distributed.checkpoint `.metadata` are among them."""
    out: set[str] = set()
    try:
        for _, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                out.add(arg)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not a pickle we can read
        raise CheckpointFormatError(f"{TORCH_DIST_METADATA} is not a readable pickle: {e!r}") from None
    return out


def _cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reward-serve"


@dataclass(frozen=True)
class NemoCheckpoint:
    path: Path  # the extracted directory or the packed .nemo file
    files: CheckpointFiles = field(compare=False, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> NemoCheckpoint:
        root = Path(path).expanduser().resolve()
        if root.is_dir():
            files: CheckpointFiles = DirectoryFiles(root)
        elif root.is_file():
            files = TarFiles.open_tar(root)
        else:
            raise CheckpointFormatError(f"{root} does not exist; expected an extracted .nemo directory or a .nemo file")
        if not files.is_file(CONFIG_FILE):
            raise CheckpointFormatError(
                f"{root} has no {CONFIG_FILE}; expected an extracted .nemo directory or a packed .nemo"
            )
        return cls(root, files)

    @property
    def packed(self) -> bool:
        return self.files.packed

    @cached_property
    def raw_config(self) -> dict[str, Any]:
        cfg = yaml.safe_load(self.files.read_bytes(CONFIG_FILE))
        if not isinstance(cfg, dict):
            raise CheckpointFormatError(f"{self.path}: {CONFIG_FILE} is not a mapping")
        return cfg

    def _member_for(self, ref: str) -> str:
        name = ref[len(NEMO_PREFIX):]
        if self.files.is_file(name):
            return name
        # NeMo stores members as "<32 hex>_<name>" and may reference either form.
        matches = [m for m in self.files.listdir() if m.endswith(f"_{name}") and self.files.is_file(m)]
        if len(matches) == 1:
            return matches[0]
        raise CheckpointFormatError(f"tokenizer {ref} not found in {self.path}")

    @cached_property
    def tokenizer_path(self) -> Path:
        ref = str(self.raw_config["tokenizer"]["model"])
        if not ref.startswith(NEMO_PREFIX):
            path = Path(ref)
            if not path.is_file():
                raise CheckpointFormatError(f"tokenizer file {ref} does not exist")
            return path
        member = self._member_for(ref)
        if isinstance(self.files, DirectoryFiles):
            return self.files.root / member
        return self._cached_member(member)

    def _cached_member(self, member: str) -> Path:
        """Copies one small member of the packed .nemo to the cache (once per archive version)."""
        st = self.path.stat()
        digest = hashlib.sha256(f"{self.path}|{st.st_size}|{st.st_mtime_ns}|{member}".encode()).hexdigest()[:20]
        dest = _cache_root() / "nemo-members" / digest / Path(member).name
        size = self.files.byte_range(member).size
        if dest.is_file() and dest.stat().st_size == size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.files.read_bytes(member))
        os.replace(tmp, dest)  # atomic: the router and the engine may open the archive at the same time
        return dest

    @cached_property
    def weights_dir_name(self) -> str:
        for name in WEIGHTS_DIRS:
            if self.files.is_dir(name):
                return name
        raise CheckpointFormatError(f"{self.path} has no {' or '.join(d + '/' for d in WEIGHTS_DIRS)}")

    @property
    def weights_dir(self) -> Path:
        """Where the weights are. For a packed .nemo this is `<file>/model_weights`, a path inside the archive
        that `sharding.checkpoints.files.open_files` (and so `sharding.checkpoints.nemo_weights.load_weights`) resolves."""
        try:
            name = self.weights_dir_name
        except CheckpointFormatError:
            name = WEIGHTS_DIR
        return self.path / name

    @cached_property
    def weights_files(self) -> CheckpointFiles:
        return self.files.subdir(self.weights_dir_name)

    @cached_property
    def weights_format(self) -> WeightsFormat:
        return read_weights_format(self.weights_files)

    @cached_property
    def arch(self) -> ModelArchConfig:
        tokenizer = spm.SentencePieceProcessor(model_file=str(self.tokenizer_path))
        arch = arch_from_nemo_config(self.raw_config, vocab_size=tokenizer.get_piece_size())
        # The head is built with a bias exactly when the checkpoint holds one (the yaml does not say).
        try:
            fmt = self.weights_format
        except CheckpointFormatError:
            return arch  # no readable weights: loading will say so; the yaml's view stands meanwhile
        has_bias = fmt.has("rm_head.bias")
        if has_bias != arch.rm_head_bias:
            arch = arch.model_copy(update={"rm_head_bias": has_bias})
        return arch


def arch_from_nemo_config(cfg: dict[str, Any], vocab_size: int | None = None) -> ModelArchConfig:
    """The architecture from NeMo's model_config.yaml keys (a full NeMo config holds many training-only keys;
    only those the service needs are read); `vocab_size` is the tokenizer's, padded here as NeMo does."""
    regression = cfg.get("regression") or {}
    num_attributes = regression.get("num_attributes") or cfg.get("output_sequence_length") or 1
    padded = cfg.get("padded_vocab_size")
    if padded is None:
        if vocab_size is None:
            raise ValueError("model_config.yaml has no padded_vocab_size and no tokenizer size was given")
        # NeMo/Megatron pad to a multiple of make_vocab_size_divisible_by * the training TP size.
        multiple = int(cfg.get("make_vocab_size_divisible_by", 128)) * int(cfg.get("tensor_model_parallel_size", 1))
        padded = -(-vocab_size // multiple) * multiple
    return ModelArchConfig(
        num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_query_groups") or cfg["num_attention_heads"],
        kv_channels=cfg.get("kv_channels"),
        normalization=cfg.get("normalization", "layernorm"),
        layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
        activation=cfg.get("activation", "gelu"),
        position_embedding_type=cfg.get("position_embedding_type", "rope"),
        rotary_percentage=cfg.get("rotary_percentage", 1.0),
        rotary_base=cfg.get("rotary_base", 10000),
        bias=cfg.get("bias", True),
        share_embeddings_and_output_weights=cfg.get("share_embeddings_and_output_weights", False),
        max_position_embeddings=cfg.get("max_position_embeddings") or cfg["encoder_seq_length"],
        padded_vocab_size=padded,
        num_attributes=num_attributes,
        rm_head_bias=cfg.get("rm_head_bias", True),
        tokenizer=TokenizerRef(library=cfg["tokenizer"]["library"], model=cfg["tokenizer"]["model"]),
    )


# ------------------------------------------------------------------------------------------ weights check

MAX_LISTED_PROBLEMS = 8


def expected_tensor_shapes(arch: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor the reward model loads, by name without the key prefix (decoder layers
    stacked on a leading layer axis, megatron-core's Transformer-Engine names: the layout
    `sharding.checkpoints.nemo_weights.load_weights` checks on every rank)."""
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
        from sharding.checkpoints.zarr import read_meta

        return {key: tuple(read_meta(files, key).shape) for key in list_arrays(files)}
    from sharding.checkpoints.dist_readers import tensor_infos  # torch_dist's index is a torch pickle

    return {key: tuple(info.shape) for key, info in tensor_infos(files, fmt).items()}


def check_weights_fit(checkpoint: NemoCheckpoint, arch: ModelArchConfig) -> None:
    """Every tensor the reward model loads is stored under the checkpoint's key prefix with the global shape
    the architecture gives it; raises CheckpointFormatError naming what is missing or mis-shaped (at most 8)."""
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


def output_names(checkpoint: NemoCheckpoint) -> tuple[str, ...]:
    """The HelpSteer2 nine for a nine-output head, one `reward`, or numbered attributes."""
    count = checkpoint.arch.num_attributes
    if count == len(ATTRIBUTE_NAMES):
        return ATTRIBUTE_NAMES
    return ("reward",) if count == 1 else tuple(f"attribute_{i}" for i in range(count))


def load(checkpoint: NemoCheckpoint, model, alone: bool = False) -> None:
    """This rank's slice of the distributed checkpoint (collective over the model's process groups, unless
    `alone`: a rank restarted by itself reads its slice with no collective)."""
    from sharding.checkpoints.nemo_weights import load_weights

    load_weights(model, checkpoint.weights_dir, alone=alone)


FORMAT = CheckpointFormat(
    name="nemo", checkpoint_type=NemoCheckpoint,
    detect=lambda path: True,  # the fallback: NemoCheckpoint.open names what the path is missing
    open=NemoCheckpoint.open, check=check_weights_fit, load=load, output_names=output_names,
)
