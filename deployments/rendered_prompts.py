"""Prompts that arrive already rendered (OpenRLHF's `query`, vLLM's `input`): tokenized as they are,
after the prompt format ends them the way it ends a conversation (`complete_rendered`: the SteerLM
template appends `<extra_id_2>` when missing; a chat template adds nothing).

Two policies for a prompt over the token limit: `truncate=True` fits it the way KServe `sentences` are
fitted (`fit_token_ids`: the system segment and the end kept, the oldest turns dropped, then the oldest
tokens; the prompt is flagged `truncated`), `truncate=False` rejects it with a 400 naming `field[i]` and
the numbers, as vLLM rejects over-long input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from deployments.errors import InputTooLongError, InvalidRequestError
from deployments.prompt import TokenizedPrompt


class RenderedPromptFormat(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def complete_rendered(self, text: str) -> str: ...

    def fit_token_ids(self, token_ids: Sequence[int], *, max_tokens: int) -> TokenizedPrompt: ...


def tokenize_rendered(
    prompt_format: RenderedPromptFormat, texts: Sequence[str], *, max_tokens: int, field: str, truncate: bool
) -> list[TokenizedPrompt]:
    """One TokenizedPrompt per text; raises InvalidRequestError / InputTooLongError naming `field[i]`."""
    prompts = []
    for index, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequestError(f"{field}[{index}] is empty", param=f"{field}[{index}]")
        ids = prompt_format.encode(prompt_format.complete_rendered(text))
        if len(ids) > max_tokens and not truncate:
            raise InputTooLongError(index, len(ids), max_tokens, field=f"{field}[{index}]")
        prompts.append(prompt_format.fit_token_ids(ids, max_tokens=max_tokens))
    return prompts
