"""One entry point for every checkpoint format: NeMo (`model_config.yaml`; directory or packed `.nemo`) and
HF (`config.json` + safetensors). No torch at import time, so the router can read configs and tokenizers."""

from __future__ import annotations

from pathlib import Path

from configs.service import ATTRIBUTE_NAMES
from sharding.checkpoints.hf import CONFIG_FILE as HF_CONFIG_FILE
from sharding.checkpoints.hf import HFCheckpoint
from sharding.checkpoints.nemo import NemoCheckpoint

Checkpoint = NemoCheckpoint | HFCheckpoint


def open_checkpoint(path: str | Path) -> Checkpoint:
    root = Path(path).expanduser()
    if root.is_dir() and (root / HF_CONFIG_FILE).is_file():
        return HFCheckpoint.open(root)
    return NemoCheckpoint.open(root)


def output_names(checkpoint: Checkpoint) -> tuple[str, ...]:
    """Names of the reward head's outputs: the HF labels, the HelpSteer2 nine, or one `reward`."""
    if isinstance(checkpoint, HFCheckpoint):
        return checkpoint.output_names
    count = checkpoint.arch.num_attributes
    if count == len(ATTRIBUTE_NAMES):
        return ATTRIBUTE_NAMES
    return ("reward",) if count == 1 else tuple(f"attribute_{i}" for i in range(count))


def load_checkpoint_into(checkpoint: Checkpoint, model) -> None:
    """Fills this rank's stage model with its slice of the checkpoint (collective for NeMo checkpoints)."""
    if isinstance(checkpoint, HFCheckpoint):
        checkpoint.load_into(model)
        return
    from sharding.checkpoints.nemo_weights import load_weights

    load_weights(model, checkpoint.weights_dir)
