"""The registry of checkpoint formats: `FORMATS`, in detection order. Each format's module declares its
`FORMAT` (`sharding.checkpoints.base.CheckpointFormat`): how to detect it, open it (config -> `arch`,
tokenizer), check its weights against the architecture before anything is deployed, and load a rank's slice.
A new format is its module with its `FORMAT` and one line in `FORMATS`.

Why the check: workers would find a checkpoint's problems only after Serve had placed them, and Serve retries
a replica whose constructor raises forever, so `serve_app.build_app` refuses a checkpoint it cannot serve.
No torch at import time, so the router can read configs and tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from configs.model import ModelArchConfig
from sharding.checkpoints import hf, nemo
from sharding.checkpoints.base import CheckpointFormat

FORMATS: tuple[CheckpointFormat, ...] = (
    hf.FORMAT,  # a directory with config.json + safetensors
    nemo.FORMAT,  # last: the fallback, whose open names what a path is missing
)

Checkpoint = Any  # one of the formats' checkpoint types (`CheckpointFormat.checkpoint_type`)


def open_checkpoint(path: str | Path) -> Checkpoint:
    root = Path(path).expanduser()
    return next(f for f in FORMATS if f.detect(root)).open(root)


def format_of(checkpoint: Checkpoint) -> CheckpointFormat:
    return next(f for f in FORMATS if isinstance(checkpoint, f.checkpoint_type))


def check_weights_fit(checkpoint: Checkpoint, arch: ModelArchConfig) -> None:
    """Raises CheckpointFormatError naming what is missing or mis-shaped, before anything is deployed."""
    format_of(checkpoint).check(checkpoint, arch)


def output_names(checkpoint: Checkpoint) -> tuple[str, ...]:
    """Names of the reward head's outputs: the HF labels, the HelpSteer2 nine, or one `reward`."""
    return format_of(checkpoint).output_names(checkpoint)


def load_checkpoint_into(checkpoint: Checkpoint, model, alone: bool = False) -> None:
    """Fills this rank's stage model with its slice of the checkpoint (collective for NeMo checkpoints, unless
    `alone`: a rank restarted by itself while its peers keep their weights, `sharding.restart`)."""
    fmt = format_of(checkpoint)
    if alone and fmt.name == "nemo":
        fmt.load(checkpoint, model, alone=True)
    else:
        fmt.load(checkpoint, model)  # HF safetensors: each rank reads its slices without collectives
