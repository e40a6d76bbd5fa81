"""The one seam between the serving layer and the compute: an engine scores token batches.

No torch here; a fake engine in tests implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class RewardEngine(Protocol):
    async def score(self, token_batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores each token sequence at its last token; returns float32 [B, num_attributes]."""

    async def check_health(self) -> None:
        """Raises if any part of the engine cannot compute."""

    def shutdown(self) -> None:
        """Releases workers and their resources."""


class EngineUnavailableError(RuntimeError):
    """The engine lost a worker or cannot reach one; the request may be retried after recovery, or at once on
    another model replica. `replica_id` names the model replica whose engine failed, where known."""

    def __init__(self, message: str, replica_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.replica_id = replica_id

    def __reduce__(self):
        return (type(self), (self.message, self.replica_id))


class BatchFault(RuntimeError):
    """A forward raised on a rank (`origin`: the rank's own exception, such as an out-of-memory on an odd batch)
    or failed because a peer left the process groups after its own fault (`collateral`). The workers survive:
    every rank leaves and rejoins the process groups with its weights kept (`sharding.engine`)."""

    def __init__(self, rank: int, message: str, collateral: bool):
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank
        self.message = message
        self.collateral = collateral

    def __reduce__(self):
        return (type(self), (self.rank, self.message, self.collateral))


@dataclass(frozen=True)
class PartialScores:
    """An engine's answer when some prompts of a batch failed and the rest were scored (the batch was bisected
    until each fault was pinned to its prompt): `attributes` float32 [B, num_attributes] with NaN rows where
    `failures` (row -> what failed, naming the rank and the exception) has an entry."""

    attributes: np.ndarray
    failures: dict[int, str]
