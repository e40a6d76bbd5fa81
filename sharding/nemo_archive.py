"""Reads an extracted `.nemo` directory: `model_config.yaml`, the tokenizer it references as
`nemo:<file>`, and where `model_weights/` is. No torch here: the router uses it to find the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import sentencepiece as spm
import yaml

from configs.model import ModelArchConfig

CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
NEMO_PREFIX = "nemo:"


class CheckpointFormatError(ValueError):
    """The checkpoint directory is missing something or holds something unreadable."""


@dataclass(frozen=True)
class NemoCheckpoint:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> NemoCheckpoint:
        root = Path(path).expanduser().resolve()
        if not (root / CONFIG_FILE).is_file():
            raise CheckpointFormatError(f"{root} has no {CONFIG_FILE}; expected an extracted .nemo directory")
        return cls(root)

    @cached_property
    def raw_config(self) -> dict[str, Any]:
        with open(self.path / CONFIG_FILE) as f:
            cfg = yaml.safe_load(f)
        if not isinstance(cfg, dict):
            raise CheckpointFormatError(f"{self.path / CONFIG_FILE} is not a mapping")
        return cfg

    @cached_property
    def tokenizer_path(self) -> Path:
        ref = str(self.raw_config["tokenizer"]["model"])
        if ref.startswith(NEMO_PREFIX):
            name = ref[len(NEMO_PREFIX):]
            exact = self.path / name
            if exact.is_file():
                return exact
            # NeMo stores members as "<32 hex>_<name>" and may reference either form.
            matches = sorted(self.path.glob(f"*_{name}"))
            if len(matches) == 1:
                return matches[0]
            raise CheckpointFormatError(f"tokenizer {ref} not found in {self.path}")
        path = Path(ref)
        if not path.is_file():
            raise CheckpointFormatError(f"tokenizer file {ref} does not exist")
        return path

    @cached_property
    def arch(self) -> ModelArchConfig:
        tokenizer = spm.SentencePieceProcessor(model_file=str(self.tokenizer_path))
        return ModelArchConfig.from_nemo_dict(self.raw_config, vocab_size=tokenizer.get_piece_size())

    @property
    def weights_dir(self) -> Path:
        return self.path / WEIGHTS_DIR
