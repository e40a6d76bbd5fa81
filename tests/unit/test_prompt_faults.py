"""`PromptFaults`: a PartialScores answer's messages reach the requests of the failed prompts only."""

import numpy as np

from deployments.prompt_faults import PromptFaults
from sharding.protocol import PartialScores


def test_failed_prompt_messages_by_token_ids():
    faults = PromptFaults()
    attributes = np.array([[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]], dtype=np.float32)
    batch = [[1, 2], [7, 7, 7], [3]]
    out = faults.unpack(PartialScores(attributes, {1: "rank 3: RuntimeError: out of memory"}), batch)
    assert out is attributes
    assert faults.message_for([7, 7, 7]) == "rank 3: RuntimeError: out of memory"
    assert faults.message_for([1, 2]) is None and faults.message_for([3]) is None


def test_plain_answers_pass_through():
    faults = PromptFaults()
    plain = np.zeros((2, 9), dtype=np.float32)
    assert faults.unpack(plain, [[1], [2]]) is plain
    assert faults.message_for([1]) is None
