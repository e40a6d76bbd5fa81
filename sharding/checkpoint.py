"""Reads and writes `model_weights/` as a megatron-core distributed checkpoint, with NeMo's `model.` prefix.

`dist_checkpointing.load` reshards: every rank describes its own slice through its model's sharded state
dict and reads only that, so a checkpoint saved at any TP/PP loads at any other. Loading is collective:
every rank of the world must call `load_weights` together.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing

NEMO_KEY_PREFIX = "model."


def _sharded_state_dict(model: torch.nn.Module) -> dict:
    sd = model.sharded_state_dict(prefix=NEMO_KEY_PREFIX)
    # Transformer-Engine extra state: local layers ask for entries old checkpoints lack, and TE's stored
    # objects fail to unpickle under weights-only loading. A reward forward needs none of it.
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def save_weights(model: torch.nn.Module, weights_dir: Path) -> None:
    weights_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(model), str(weights_dir))


def load_weights(model: torch.nn.Module, weights_dir: Path) -> None:
    sharded = _sharded_state_dict(model)
    loaded = dist_checkpointing.load(sharded, str(weights_dir))
    state = {k[len(NEMO_KEY_PREFIX):]: v for k, v in loaded.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {weights_dir} did not fill the model: missing {missing}, unexpected {unexpected}")
