"""Fitting a prompt into the token limit, in O(tokens): the left-truncation policy of `truncate: "left"`
and of the KServe route.

A prompt is its tokens with the index where each turn starts (the system segment before the first, the end
marker `<extra_id_2>` after the last); turn `i` spans `ids[turn_starts[i]:turn_starts[i + 1]]`, so the
token count of any run of turns is one subtraction (the turn starts are the prefix sums of the turn
lengths). The prompt of turns `0..last` over the limit is fitted so that it stays like a training prompt:

1. the system segment, the scored turn `last` and its question (the user turn right before it) are kept
   whenever they fit together with the end marker;
2. older turns are then added back newest first while they fit whole; the rest are dropped whole;
3. when the protected turns do not fit, the oldest of them is cut inside: it keeps its header
   (`<extra_id_1>User\\n`) and the end of its text (re-rendered, `SegmentedPrompt.cut_turn`); when not even
   one token of its text fits, it is dropped and the next one is cut;
4. when not even the scored turn's header and one token of its text fit beside the system segment and the
   end marker, the prompt cannot be fitted (InputTooLongError).

Finding how many older turns fit is a binary search over the turn starts; the output is built by slicing.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from deployments.errors import InputTooLongError

SYSTEM_MARKER = "<extra_id_0>"
TURN_MARKER = "<extra_id_1>"
END_MARKER = "<extra_id_2>"
ROLE_LABELS = {"user": "User", "assistant": "Assistant"}

TruncateMode = Literal["none", "left"]


@dataclass(frozen=True)
class TokenizedPrompt:
    token_ids: list[int]
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class SegmentedPrompt:
    """`ids`: system segment, turns, end marker(s). `turn_starts`: where each turn starts, then where the end
    starts (len = turns + 1)."""

    def __init__(self, ids: list[int], turn_starts: Sequence[int]):
        self.ids = ids
        self.turn_starts = turn_starts

    @property
    def num_turns(self) -> int:
        return len(self.turn_starts) - 1

    @property
    def system_length(self) -> int:
        return self.turn_starts[0]

    @property
    def end_ids(self) -> list[int]:
        return self.ids[self.turn_starts[-1]:]

    def role(self, index: int) -> str:
        """"user", "assistant" or "?" (unknown)."""
        raise NotImplementedError

    def cut_turn(self, index: int, budget: int) -> list[int] | None:
        """Turn `index` (longer than `budget`) within `budget` tokens: its header and the end of its text;
        None when not even its header and one token of text fit."""
        raise NotImplementedError


def fit_prompt(
    prompt: SegmentedPrompt,
    last: int,
    max_tokens: int,
    truncate: TruncateMode,
    conversation_index: int,
    field: str | None,
) -> TokenizedPrompt:
    """The prompt of turns `0..last` and the end marker within `max_tokens` (the policy above)."""
    ids, starts, end = prompt.ids, prompt.turn_starts, prompt.end_ids
    system = int(prompt.system_length)
    stop = int(starts[last + 1])
    total = stop + len(end)
    if total <= max_tokens:
        return TokenizedPrompt(ids[:stop] + end, truncated=False)
    if truncate == "none":
        raise InputTooLongError(conversation_index, total, max_tokens, field=field)
    room = max_tokens - system - len(end)
    first = last - 1 if last >= 1 and prompt.role(last - 1) == "user" and prompt.role(last) != "user" else last
    if room >= 0 and stop - starts[first] <= room:
        kept = bisect_left(starts, stop - room, 0, first + 1)  # the oldest turn from which all fit whole
        return TokenizedPrompt(ids[:system] + ids[starts[kept]:stop] + end, truncated=True)
    for index in range(first, last + 1):
        budget = room - (stop - starts[index + 1])
        if starts[index + 1] - starts[index] <= budget:  # the turn after a dropped question may fit whole
            return TokenizedPrompt(ids[:system] + ids[starts[index]:stop] + end, truncated=True)
        cut = prompt.cut_turn(index, budget) if budget > 0 else None
        if cut is not None:
            return TokenizedPrompt(ids[:system] + cut + ids[starts[index + 1]:stop] + end, truncated=True)
    raise InputTooLongError(
        conversation_index, total, max_tokens, field=field,
        detail=f"truncate=left cannot fit it: the system prompt and end marker take {system + len(end)} tokens, "
               "and the scored turn needs its header and at least one token of its text besides",
    )


def fit_token_ids(prompt: SegmentedPrompt, max_tokens: int) -> TokenizedPrompt:
    """An already formatted prompt (KServe) fitted like a conversation; one that cannot be (no turn marker,
    a system segment that leaves no room) keeps its last `max_tokens` tokens."""
    if len(prompt.ids) <= max_tokens:
        return TokenizedPrompt(list(prompt.ids), truncated=False)
    if prompt.num_turns:
        try:
            return fit_prompt(prompt, prompt.num_turns - 1, max_tokens, "left", 0, None)
        except InputTooLongError:
            pass
    return TokenizedPrompt(prompt.ids[-max_tokens:], truncated=True)
