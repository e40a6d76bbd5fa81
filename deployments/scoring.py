"""Turns the reward head's attribute vectors into rewards: the scalar score = dot(weights, attributes), and
named rewards = {name: dot(vector, attributes)} for named weight vectors (GDPO-style multi-objective RL reads
a reward dictionary per sample).

The router calls `ScoringDeployment.weigh` once per model batch, with each prompt's weights (a request's own
`weights`: one vector, or named vectors; None for the defaults), and builds each request's results with
`scored_rows`. The named rewards come back on each prompt's `PromptWeights` (the batcher's per-prompt extra).

`WeightedScorer` is the plain math (testable without Ray); `ScoringDeployment` wraps it and takes new
default weights and named weights through `user_config` (`{"weights": [...], "named_weights": {...}}`)
without a restart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from pydantic import Field, ValidationError
from ray import serve

from configs.base import StrictModel
from configs.scoring import check_named_weights, reward_name_problem
from configs.service import ServiceConfig
from deployments.errors import InvalidRequestError
from deployments.schemas import FiniteFloat


WeightsObject = Sequence[float] | Mapping[str, Sequence[float]] | None  # a request's `weights`, as validated


class ScoringUserConfig(StrictModel):
    weights: tuple[FiniteFloat, ...] = Field(description="New default weights, one per attribute, in order.")
    named_weights: dict[str, tuple[FiniteFloat, ...]] | None = Field(
        default=None, description="New default named weight vectors (`scoring.named_weights`); absent or null: "
        "no named rewards unless a request names its own.")


class WeighedBatch(NamedTuple):
    """`weigh`'s answer: float64 [B] scalar scores, and per row its named rewards (`{name: value}`, None for a
    row without named weights), or None when no row of the batch has any (no list to build or send)."""

    scores: np.ndarray
    rewards: list[dict[str, float] | None] | None


class PromptWeights:
    """One prompt's weights through the router's batch queue (the batcher's opaque per-prompt `extra`): its
    request's `weights` on the way to `weigh`, and the prompt's named rewards on the way back. The batcher hands
    each prompt back only its row of numbers; the rewards (a name per value) come back on this object."""

    __slots__ = ("weights", "rewards")

    def __init__(self, weights: WeightsObject):
        self.weights = weights
        self.rewards: dict[str, float] | None = None


def checked_vector(weights: Sequence[float], num_attributes: int, name: str) -> np.ndarray:
    """float64 [A]; ValueError naming `name` and the numbers when it has the wrong length or is not finite."""
    array = np.asarray(weights, dtype=np.float64)
    if array.shape != (num_attributes,):
        raise ValueError(f"{name} has {array.size} values; the model has {num_attributes} attributes")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite numbers; got {list(weights)}")
    return array


def check_request_weights(weights: WeightsObject, attribute_names: Sequence[str]) -> None:
    """A request's `weights` against the model, before any work: InvalidRequestError naming the field
    (`weights`, `weights.helpful`) and the numbers."""
    if weights is None:
        return
    if isinstance(weights, Mapping):
        problem = reward_name_problem(weights)
        if problem is not None:
            raise InvalidRequestError(f"weights: {problem}", param="weights")
        vectors = [(f"weights.{name}", vector) for name, vector in weights.items()]
    else:
        vectors = [("weights", weights)]
    for field, vector in vectors:
        try:
            checked_vector(vector, len(attribute_names), field)
        except ValueError as exc:
            raise InvalidRequestError(f"{exc} ({', '.join(attribute_names)})", param=field) from None


class WeightedScorer:
    """Holds attribute names, default weights and default named weights; scores [N, A] attribute arrays in
    float64. A request's `weights` is one vector (it replaces the default weights of the scalar) or named vectors
    (they replace the default named weights; the scalar keeps the default weights)."""

    def __init__(self, attribute_names: Sequence[str], weights: Sequence[float],
                 named_weights: Mapping[str, Sequence[float]] | None = None):
        self.attribute_names = tuple(attribute_names)
        self.set_weights(weights, named_weights)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def set_weights(self, weights: Sequence[float], named_weights: Mapping[str, Sequence[float]] | None = None) -> None:
        checked = self._checked_weights(weights, "weights")
        named = None if named_weights is None else self._checked_named(named_weights, "named_weights")
        self.weights, self.named_weights = checked, named

    def _checked_weights(self, weights: Sequence[float], name: str) -> np.ndarray:
        return checked_vector(weights, self.num_attributes, name)

    def _checked_named(self, named: Mapping[str, Sequence[float]], field: str) -> dict[str, np.ndarray]:
        """Names within the limits (`configs.scoring`), each vector as `checked_vector`: `{name: float64 [A]}`."""
        problem = reward_name_problem(named)
        if problem is not None:
            raise ValueError(f"{field}: {problem}")
        return {name: self._checked_weights(vector, f"{field}.{name}") for name, vector in named.items()}

    def score(self, attributes: Sequence[Sequence[float]] | np.ndarray, weights: WeightsObject = None
              ) -> list[dict[str, Any]]:
        """One `{"score", "attributes"}` (and `"rewards"` with named weights) per row; `weights` overrides the
        defaults for this call and raises InvalidRequestError naming the field when it does not fit the model."""
        check_request_weights(weights, self.attribute_names)
        array = self._checked_attributes(attributes)
        weighed = self.weigh(array, [weights] * array.shape[0])
        return scored_rows(self.attribute_names, array, weighed.scores, weights, weighed.rewards)

    def weigh(self, attributes: Sequence[Sequence[float]] | np.ndarray,
              weights_per_row: Sequence[WeightsObject]) -> WeighedBatch:
        """Scores (and named rewards) of a whole model batch, each row with its own weights (None: the defaults).
        Never raises for one row's numbers (a non-finite attribute, a dot product that overflows): that row's
        value is not finite and `scored_rows` turns it into that request's error, so batch mates are not failed.
        The rows of one request share one weights object, which is checked once."""
        array = self._checked_attributes(attributes)
        if len(weights_per_row) != array.shape[0]:
            raise ValueError(f"{len(weights_per_row)} weight rows for {array.shape[0]} attribute rows")
        scalar: dict[int, np.ndarray] = {}
        named: dict[int, dict[str, np.ndarray]] = {}
        for w in weights_per_row:
            if isinstance(w, Mapping):
                if id(w) not in named:
                    named[id(w)] = self._checked_named(w, "weights")
            elif w is not None and id(w) not in scalar:
                scalar[id(w)] = self._checked_weights(w, "weights")
        matrix = (np.stack([scalar.get(id(w), self.weights) for w in weights_per_row])
                  if weights_per_row else np.zeros((0, self.num_attributes)))
        with np.errstate(over="ignore", invalid="ignore"):
            scores = np.einsum("na,na->n", array, matrix)
        if not named and self.named_weights is None:
            return WeighedBatch(scores, None)
        rewards: list[dict[str, float] | None] = []
        for row, w in zip(array, weights_per_row):
            vectors = named.get(id(w), self.named_weights)
            if vectors is None:
                rewards.append(None)
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                values = np.einsum("a,ka->k", row, np.stack(list(vectors.values())))
            rewards.append({name: float(v) for name, v in zip(vectors, values)})
        return WeighedBatch(scores, rewards)

    def _checked_attributes(self, attributes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        array = np.asarray(attributes, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.num_attributes:
            raise ValueError(f"attributes have shape {array.shape}; expected [N, {self.num_attributes}]")
        return array


def scored_rows(attribute_names: Sequence[str], attributes: np.ndarray, scores: np.ndarray,
                request_weights: WeightsObject, rewards: Sequence[dict[str, float] | None] | None = None
                ) -> list[dict[str, Any]]:
    """One `{"score", "attributes"}` per row of one request, with `"rewards"` where the row has named rewards.
    `request_weights` is the request's own `weights` (None: the service's), which says whose weights an
    overflow is: ValueError when an attribute is not finite or the service's weights overflow a value,
    InvalidRequestError naming the field (`weights`, `weights.helpful`) when the request's own weights do:
    never a null score."""
    attributes = np.asarray(attributes, dtype=np.float64)
    if not np.all(np.isfinite(attributes)):
        raise ValueError(f"attributes {int(np.flatnonzero(~np.isfinite(attributes).all(axis=1))[0])} are not finite")
    overflow = np.flatnonzero(~np.isfinite(scores))
    if overflow.size:  # finite weights and attributes whose dot product overflows float64: never a null score
        _overflow("score", int(overflow[0]), scores[overflow[0]], "weights",
                  own=request_weights is not None and not isinstance(request_weights, Mapping))
    rows = [
        {"score": float(scores[i]), "attributes": {name: float(v) for name, v in zip(attribute_names, attributes[i])}}
        for i in range(attributes.shape[0])
    ]
    for i, named in enumerate(rewards or ()):
        if named is None:
            continue
        for name, value in named.items():
            if not np.isfinite(value):
                _overflow(f"reward {name!r}", i, value, f"weights.{name}", own=isinstance(request_weights, Mapping))
        rows[i]["rewards"] = dict(named)
    return rows


def _overflow(what: str, prompt: int, value: float, field: str, own: bool) -> None:
    message = (f"the {what} of prompt {prompt} overflows to {value} with "
               f"{'these' if own else 'the service'} weights; use smaller weights")
    if not own:
        raise ValueError(message)
    raise InvalidRequestError(message, param=field)


def parse_scoring_user_config(user_config: dict[str, Any], num_attributes: int) -> ScoringUserConfig:
    """Validates `{"weights": [...], "named_weights": {...}}`; raises ValueError naming what is wrong."""
    try:
        parsed = ScoringUserConfig.model_validate(user_config)
    except ValidationError as exc:
        raise ValueError(f"invalid scoring user_config {user_config!r}: {exc}") from None
    if len(parsed.weights) != num_attributes:
        raise ValueError(
            f"invalid scoring user_config: weights has {len(parsed.weights)} values; "
            f"the model has {num_attributes} attributes"
        )
    if parsed.named_weights is not None:
        try:
            check_named_weights(parsed.named_weights, num_attributes, "named_weights")
        except ValueError as exc:
            raise ValueError(f"invalid scoring user_config: {exc}") from None
    return parsed


def parse_user_config(user_config: dict[str, Any], num_attributes: int) -> tuple[float, ...]:
    """The default weights of a scoring user_config (`parse_scoring_user_config`)."""
    return parse_scoring_user_config(user_config, num_attributes).weights


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ScoringDeployment:
    def __init__(self, config: dict[str, Any]):
        cfg = ServiceConfig.model_validate(config)
        self._scorer = WeightedScorer(cfg.scoring.attribute_names, cfg.scoring.weights, cfg.scoring.named_weights)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        parsed = parse_scoring_user_config(user_config, self._scorer.num_attributes)
        self._scorer.set_weights(parsed.weights, parsed.named_weights)

    def score(self, attributes: Sequence[Sequence[float]] | np.ndarray, weights: WeightsObject = None
              ) -> list[dict[str, Any]]:
        return self._scorer.score(attributes, weights)

    def weigh(self, attributes: np.ndarray, weights_per_row: Sequence[WeightsObject]) -> WeighedBatch:
        """Scores and named rewards of one model batch (the router calls this once per batch, not per request)."""
        return self._scorer.weigh(attributes, weights_per_row)

    def current_weights(self) -> list[float]:
        return self._scorer.weights.tolist()

    def current_named_weights(self) -> dict[str, list[float]] | None:
        named = self._scorer.named_weights
        return None if named is None else {name: vector.tolist() for name, vector in named.items()}
