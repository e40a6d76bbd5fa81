"""Turns the reward head's attribute vectors into scalar rewards: score = dot(weights, attributes).

The router calls `ScoringDeployment.weigh` once per model batch, with each prompt's weights (a request's own
`weights`, or None for the defaults), and builds each request's results with `scored_rows`.

`WeightedScorer` is the plain math (testable without Ray); `ScoringDeployment` wraps it and takes new
default weights through `user_config` (`{"weights": [...]}`) without a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field, ValidationError
from ray import serve

from configs.base import StrictModel
from configs.service import ServiceConfig
from deployments.errors import InvalidRequestError
from deployments.schemas import FiniteFloat


class ScoringUserConfig(StrictModel):
    weights: tuple[FiniteFloat, ...] = Field(description="New default weights, one per attribute, in order.")


class WeightedScorer:
    """Holds attribute names and default weights; scores [N, A] attribute arrays in float64."""

    def __init__(self, attribute_names: Sequence[str], weights: Sequence[float]):
        self.attribute_names = tuple(attribute_names)
        self.weights = self._checked_weights(weights, "weights")

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def set_weights(self, weights: Sequence[float]) -> None:
        self.weights = self._checked_weights(weights, "weights")

    def _checked_weights(self, weights: Sequence[float], name: str) -> np.ndarray:
        array = np.asarray(weights, dtype=np.float64)
        if array.shape != (self.num_attributes,):
            raise ValueError(f"{name} has {array.size} values; the model has {self.num_attributes} attributes")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} must be finite numbers; got {list(weights)}")
        return array

    def score(
        self, attributes: Sequence[Sequence[float]] | np.ndarray, weights: Sequence[float] | None = None
    ) -> list[dict[str, Any]]:
        """One `{"score", "attributes"}` per row; `weights` overrides the defaults for this call and
        raises InvalidRequestError (param `weights`) when it has the wrong length."""
        checked = None
        if weights is not None:
            try:
                checked = self._checked_weights(weights, "weights")
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param="weights") from None
        array = self._checked_attributes(attributes)
        scores = self._dot(array, np.broadcast_to(self.weights if checked is None else checked, array.shape))
        return scored_rows(self.attribute_names, array, scores, custom_weights=weights is not None)

    def weigh(self, attributes: Sequence[Sequence[float]] | np.ndarray,
              weights_per_row: Sequence[Sequence[float] | None]) -> np.ndarray:
        """float64 [N] scores of a whole model batch, each row with its own weights (None: the defaults). Never
        raises for one row's numbers (a non-finite attribute, a dot product that overflows): that row's score
        is not finite and `scored_rows` turns it into that request's error, so batch mates are not failed.
        The rows of one request share one weights object, which is checked once."""
        array = self._checked_attributes(attributes)
        if len(weights_per_row) != array.shape[0]:
            raise ValueError(f"{len(weights_per_row)} weight rows for {array.shape[0]} attribute rows")
        checked: dict[int, np.ndarray] = {}
        for w in weights_per_row:
            if w is not None and id(w) not in checked:
                checked[id(w)] = self._checked_weights(w, "weights")
        matrix = (np.stack([self.weights if w is None else checked[id(w)] for w in weights_per_row])
                  if weights_per_row else np.zeros((0, self.num_attributes)))
        return self._dot(array, matrix)

    @staticmethod
    def _dot(attributes: np.ndarray, weights: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.einsum("na,na->n", attributes, weights)

    def _checked_attributes(self, attributes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        array = np.asarray(attributes, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.num_attributes:
            raise ValueError(f"attributes have shape {array.shape}; expected [N, {self.num_attributes}]")
        return array


def scored_rows(attribute_names: Sequence[str], attributes: np.ndarray, scores: np.ndarray,
                custom_weights: bool) -> list[dict[str, Any]]:
    """One `{"score", "attributes"}` per row of one request. Raises ValueError when an attribute is not finite
    or the service weights overflow a score, InvalidRequestError (param `weights`) when the request's own
    weights do: never a null score."""
    attributes = np.asarray(attributes, dtype=np.float64)
    if not np.all(np.isfinite(attributes)):
        raise ValueError(f"attributes {int(np.flatnonzero(~np.isfinite(attributes).all(axis=1))[0])} are not finite")
    overflow = np.flatnonzero(~np.isfinite(scores))
    if overflow.size:  # finite weights and attributes whose dot product overflows float64: never a null score
        message = (f"the score of prompt {int(overflow[0])} overflows to {scores[overflow[0]]} with "
                   f"{'these' if custom_weights else 'the service'} weights; use smaller weights")
        if not custom_weights:
            raise ValueError(message)
        raise InvalidRequestError(message, param="weights")
    return [
        {"score": float(scores[i]), "attributes": {name: float(v) for name, v in zip(attribute_names, attributes[i])}}
        for i in range(attributes.shape[0])
    ]


def parse_user_config(user_config: dict[str, Any], num_attributes: int) -> tuple[float, ...]:
    """Validates `{"weights": [...]}`; raises ValueError naming what is wrong."""
    try:
        parsed = ScoringUserConfig.model_validate(user_config)
    except ValidationError as exc:
        raise ValueError(f"invalid scoring user_config {user_config!r}: {exc}") from None
    if len(parsed.weights) != num_attributes:
        raise ValueError(
            f"invalid scoring user_config: weights has {len(parsed.weights)} values; "
            f"the model has {num_attributes} attributes"
        )
    return parsed.weights


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ScoringDeployment:
    def __init__(self, config: dict[str, Any]):
        cfg = ServiceConfig.model_validate(config)
        self._scorer = WeightedScorer(cfg.scoring.attribute_names, cfg.scoring.weights)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._scorer.set_weights(parse_user_config(user_config, self._scorer.num_attributes))

    def score(
        self, attributes: Sequence[Sequence[float]] | np.ndarray, weights: Sequence[float] | None = None
    ) -> list[dict[str, Any]]:
        return self._scorer.score(attributes, weights)

    def weigh(self, attributes: np.ndarray, weights_per_row: Sequence[Sequence[float] | None]) -> np.ndarray:
        """float64 [B] scores of one model batch (the router calls this once per batch, not per request)."""
        return self._scorer.weigh(attributes, weights_per_row)

    def current_weights(self) -> list[float]:
        return self._scorer.weights.tolist()
