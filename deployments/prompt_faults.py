"""Per-prompt failures from the model (issue 22): when a fault inside a forward was pinned to some prompts of a
batch (`sharding.engine` bisects the batch), the model deployment answers `sharding.protocol.PartialScores`:
float32 attributes with NaN rows, and row -> message for the prompts that failed. The router turns only
those prompts' requests into a 500 in the error shape naming the failure; every other request of the batch
gets its scores. No torch here.

The router's batch call (`Router._run_model_batch`) unpacks the answer here and keeps the messages by the
prompts' token ids; the request whose prompt has a non-finite row (`Router._score_tokens`) reads its message
back. Messages are kept for the last CAPACITY failed prompts (a prompt's request reads it within the same
batch's round trip)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from sharding.protocol import PartialScores

CAPACITY = 1024


class PromptFaults:
    def __init__(self) -> None:
        self._messages: OrderedDict[tuple[int, ...], str] = OrderedDict()

    def unpack(self, output: Any, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """The model's attributes; a PartialScores' failures are kept for `message_for`."""
        if not isinstance(output, PartialScores):
            return output
        for row, message in output.failures.items():
            key = tuple(token_lists[row])
            self._messages[key] = message
            self._messages.move_to_end(key)
        while len(self._messages) > CAPACITY:
            self._messages.popitem(last=False)
        return output.attributes

    def message_for(self, token_ids: Sequence[int]) -> str | None:
        """What failed for this prompt in its batch, or None (the row is non-finite for another reason)."""
        return self._messages.get(tuple(token_ids))
