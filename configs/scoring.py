"""What the scoring deployment weighs: the head's attribute names, the default weights of the scalar reward,
and named weight sets (`named_weights`), each giving one named reward per result beside the scalar, the
reward dictionary multi-objective RL (GDPO-style) consumes. The limits on names (how many, how long, which
characters) hold for the config and for a request's own named `weights` alike."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated

from pydantic import Field, model_validator

from configs.base import StrictModel

ATTRIBUTE_NAMES: tuple[str, ...] = (
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
)
DEFAULT_WEIGHTS: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.3, 0.74, 0.46, 0.47, -0.33)

MAX_REWARD_NAMES = 16  # named weight sets per request (or in the config)
MAX_REWARD_NAME_CHARS = 64
REWARD_NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"
_REWARD_NAME = re.compile(REWARD_NAME_PATTERN)

Finite = Annotated[float, Field(allow_inf_nan=False)]


def reward_name_problem(names: Iterable[str]) -> str | None:
    """What is wrong with a set of reward names, with the numbers (`17 names; the limit is 16`), or None."""
    names = list(names)
    if not names:
        return "no names; give at least one named weight vector"
    if len(names) > MAX_REWARD_NAMES:
        return f"{len(names)} names; the limit is {MAX_REWARD_NAMES}"
    for name in names:
        if not isinstance(name, str):  # a handle caller's dict may have non-string keys
            return f"the name {name!r} is not a string"
        if len(name) > MAX_REWARD_NAME_CHARS:
            return f"the name {name[:16]!r}... has {len(name)} characters; the limit is {MAX_REWARD_NAME_CHARS}"
        if not _REWARD_NAME.match(name):
            return f"the name {name!r} may only have letters, digits, '_', '.' and '-'"
    return None


class ScoringConfig(StrictModel):
    attribute_names: tuple[str, ...] = Field(
        default=ATTRIBUTE_NAMES, min_length=1, description="Names of the head's outputs, in order."
    )
    weights: tuple[float, ...] = Field(
        default=DEFAULT_WEIGHTS, description="Scalar reward = dot(weights, attributes)."
    )
    named_weights: dict[str, tuple[Finite, ...]] | None = Field(
        default=None,
        description="Named weight vectors, one value per attribute each: every `/v1/score` result then also has "
        f"`rewards` = {{name: dot(vector, attributes)}} (a request's own named `weights` replace them). At most "
        f"{MAX_REWARD_NAMES} names of at most {MAX_REWARD_NAME_CHARS} letters, digits, `_`, `.` or `-`. Null: "
        "no named rewards.",
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> ScoringConfig:
        # With only one of the two given, the other comes from the checkpoint (ServiceConfig.with_output_names,
        # which validates the completed pair again).
        given = {"attribute_names", "weights"} & self.model_fields_set
        if len(given) != 1 and len(self.weights) != len(self.attribute_names):
            raise ValueError(
                f"weights has {len(self.weights)} values; attribute_names has {len(self.attribute_names)}"
            )
        if len(set(self.attribute_names)) != len(self.attribute_names):
            raise ValueError(f"attribute_names has duplicates: {list(self.attribute_names)}")
        if self.named_weights is not None:
            size = (len(self.attribute_names) if "attribute_names" in given
                    else len(self.weights) if "weights" in given else None)  # None: from the checkpoint
            check_named_weights(self.named_weights, size, "scoring.named_weights")
        return self


def check_named_weights(named: dict[str, tuple[float, ...]], num_attributes: int | None, field: str) -> None:
    """Names within the limits and every vector `num_attributes` long (None: all the same length, the head's
    size being not known yet); ValueError naming `field`."""
    problem = reward_name_problem(named)
    if problem is not None:
        raise ValueError(f"{field}: {problem}")
    for name, vector in named.items():
        expected = len(next(iter(named.values()))) if num_attributes is None else num_attributes
        if len(vector) != expected:
            raise ValueError(f"{field}.{name} has {len(vector)} values; "
                             f"{'the model has' if num_attributes is not None else 'the first vector has'} {expected}")
