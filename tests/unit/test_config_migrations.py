"""Configs written for earlier versions: a renamed or removed key fails naming what replaced it
(configs/migrations.py), not with pydantic's generic "extra inputs are not permitted"."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from configs import ServiceConfig
from configs.migrations import MIGRATIONS

REPO = Path(__file__).resolve().parents[2]
OLD_VALUES = {"parallel.micro_batch_size": 4, "router.batch_wait_timeout_s": 0.02, "router.max_concurrent_batches": 2}


def shipped_args(name: str) -> dict:
    """The app's `args` of a shipped Serve config file."""
    return yaml.safe_load((REPO / "configs" / name).read_text())["applications"][0]["args"]


def with_key(args: dict, path: str, value) -> dict:
    args = copy.deepcopy(args)
    *parents, key = path.split(".")
    node = args
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    return args


def field_of(path: str) -> object:
    """The pydantic field at a dotted path of ServiceConfig, or None."""
    model: type[BaseModel] | None = ServiceConfig
    field = None
    for part in path.split("."):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
            else None
    return field


def test_every_old_key_has_a_value_to_try():
    assert set(OLD_VALUES) == set(MIGRATIONS)


@pytest.mark.parametrize("config_file", ["local.yaml", "nemotron4_340b.yaml"])
@pytest.mark.parametrize("path", list(MIGRATIONS))
def test_an_old_key_names_its_replacement(path, config_file):
    args = shipped_args(config_file)
    ServiceConfig.model_validate(args)  # the shipped file itself is valid
    with pytest.raises(ValidationError) as info:
        ServiceConfig.model_validate(with_key(args, path, OLD_VALUES[path]))
    (error,) = info.value.errors()
    assert MIGRATIONS[path] in error["msg"] and "Extra inputs" not in str(info.value)
    assert error["msg"].count(" was ") == 1


def test_the_micro_batch_message_is_the_one_the_issue_asks_for():
    with pytest.raises(ValidationError, match=re.escape(
            "parallel.micro_batch_size was removed: set parallel.max_tokens_per_micro_batch (tokens per micro-batch")):
        ServiceConfig.model_validate({"checkpoint_path": "/x", "parallel": {"micro_batch_size": 8}})


def test_every_old_key_of_a_config_is_named_at_once():
    args = {"checkpoint_path": "/x"}
    for path, value in OLD_VALUES.items():
        args = with_key(args, path, value)
    with pytest.raises(ValidationError) as info:
        ServiceConfig.model_validate(args)
    assert all(path in str(info.value) for path in MIGRATIONS)


def test_an_unknown_key_that_is_no_old_one_still_fails_as_extra():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ServiceConfig.model_validate({"checkpoint_path": "/x", "router": {"micro_batch_size": 4}})


@pytest.mark.parametrize("path", list(MIGRATIONS))
def test_old_keys_are_gone_and_their_replacements_exist(path):
    assert field_of(path) is None, f"{path} is a field again: its migration would hide it"
    replacements = re.findall(r"set ([a-z_]+\.[a-z_]+)", MIGRATIONS[path])
    assert replacements and all(field_of(name) is not None for name in replacements), replacements
