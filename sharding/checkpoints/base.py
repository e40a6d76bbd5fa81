"""What every checkpoint format declares (`CheckpointFormat`), and the error a format raises for files it
cannot read. No torch here: the router reads configs and tokenizers through the formats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.model import ModelArchConfig


class CheckpointFormatError(ValueError):
    """The checkpoint is missing something or holds something unreadable."""


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format, declared by its module as `FORMAT` and listed in `formats.FORMATS`.

    `open` returns the format's checkpoint object, which has `path`, `arch` (a `ModelArchConfig`) and
    `tokenizer_path`; `check` and `output_names` read no weights into memory and import no torch for the
    checkpoint's metadata where the format allows it; `load` runs on every worker rank."""

    name: str
    checkpoint_type: type
    detect: Callable[[Path], bool]  # whether the files at this path are this format's
    open: Callable[[Path], Any]  # the checkpoint: config, tokenizer, where its weights are
    check: Callable[[Any, ModelArchConfig], None]  # raises CheckpointFormatError for weights that cannot fill `arch`
    load: Callable[[Any, Any], None]  # fills one rank's stage model with its slice of the weights
    output_names: Callable[[Any], tuple[str, ...]]  # names of the reward head's outputs
