"""The one seam between the serving layer and the compute: an engine scores token batches.

No torch here; a fake engine in tests implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
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
