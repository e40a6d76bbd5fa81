"""The checkpoint formats' registry (`sharding.checkpoints.formats.FORMATS`): every format declares what the
service needs of it, detection picks the format from the files, and NeMo, the fallback, names what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sharding.checkpoints import formats, hf, nemo
from sharding.checkpoints.base import CheckpointFormatError


def test_every_format_is_registered_once_and_nemo_is_the_fallback():
    assert [f.name for f in formats.FORMATS] == ["hf", "nemo"]
    assert len({f.checkpoint_type for f in formats.FORMATS}) == len(formats.FORMATS)
    assert formats.FORMATS[-1] is nemo.FORMAT and nemo.FORMAT.detect(Path("/no/such/checkpoint"))


def test_detection_picks_the_format_from_the_files(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / hf.CONFIG_FILE).write_text(json.dumps({"architectures": ["GPT2ForSequenceClassification"]}))
    with pytest.raises(ValueError, match="architecture 'GPT2ForSequenceClassification' is not supported"):
        formats.open_checkpoint(tmp_path / "hf")  # read as HF: its own refusal
    with pytest.raises(CheckpointFormatError, match="does not exist; expected an extracted .nemo directory"):
        formats.open_checkpoint(tmp_path / "missing")  # no format claims it: NeMo's open says what is missing
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="has no model_config.yaml"):
        formats.open_checkpoint(tmp_path / "empty")


def test_a_checkpoint_dispatches_to_its_own_format(tmp_path):
    from demo import write_demo_model

    checkpoint = formats.open_checkpoint(write_demo_model(tmp_path / "demo", seed=0))
    assert formats.format_of(checkpoint) is nemo.FORMAT
    assert len(formats.output_names(checkpoint)) == checkpoint.arch.num_attributes
    formats.check_weights_fit(checkpoint, checkpoint.arch)  # the demo fits its own architecture
