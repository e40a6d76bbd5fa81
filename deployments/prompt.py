"""The SteerLM reward prompt (NeMo-Aligner's template) and its tokenization with a token limit.

A conversation renders as a system segment, one segment per turn and the end marker:

    <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{text}\\n<extra_id_1>Assistant\\n{text}\\n<extra_id_2>

The model reads its score at the last token, `<extra_id_2>`. Every segment starts with an `<extra_id_N>`
piece, so tokenizing segment by segment gives the same ids as tokenizing the whole string; that lets
truncation count and drop whole turns without re-tokenizing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm

from deployments.errors import InputTooLongError
from deployments.schemas import Message

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
SYSTEM_MARKER = "<extra_id_0>"
TURN_MARKER = "<extra_id_1>"
END_MARKER = "<extra_id_2>"
ROLE_LABELS = {"user": "User", "assistant": "Assistant"}

TruncateMode = Literal["none", "left"]


@dataclass(frozen=True)
class PromptSegments:
    """The rendered prompt in pieces; `"".join` of them in order is the full prompt string."""

    system: str
    turns: tuple[str, ...]
    end: str = END_MARKER

    @property
    def text(self) -> str:
        return self.system + "".join(self.turns) + self.end


def render_segments(messages: Sequence[Message]) -> PromptSegments:
    """Splits validated messages into the template's segments; a leading system message replaces the
    default system text."""
    system_text = DEFAULT_SYSTEM_PROMPT
    turns = list(messages)
    if turns and turns[0].role == "system":
        system_text = turns[0].content
        turns = turns[1:]
    rendered = []
    for message in turns:
        if message.role not in ROLE_LABELS:
            raise ValueError(f"role {message.role!r} cannot appear after the first message")
        rendered.append(f"{TURN_MARKER}{ROLE_LABELS[message.role]}\n{message.content}\n")
    return PromptSegments(system=f"{SYSTEM_MARKER}System\n{system_text}\n", turns=tuple(rendered))


def render_prompt(messages: Sequence[Message]) -> str:
    """The exact prompt string the model scores."""
    return render_segments(messages).text


class SentencePieceTokenizer:
    """Plain SentencePiece encoding without BOS/EOS, checked to keep the chat markers as single pieces."""

    def __init__(self, model_path: str | Path):
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.model_path = Path(model_path)
        for marker in (SYSTEM_MARKER, TURN_MARKER, END_MARKER):
            marker_id = self._sp.piece_to_id(marker)
            if marker_id == self._sp.unk_id() or self.encode(marker) != [marker_id]:
                raise ValueError(
                    f"tokenizer {model_path} does not encode {marker} as one piece (got {self.encode(marker)}); "
                    "the reward prompt needs its markers as single tokens"
                )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def piece_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._sp.decode(list(token_ids))


@dataclass(frozen=True)
class TokenizedPrompt:
    token_ids: list[int]
    truncated: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def tokenize_conversation(
    messages: Sequence[Message],
    tokenizer: SentencePieceTokenizer,
    *,
    max_tokens: int,
    truncate: TruncateMode = "none",
    conversation_index: int = 0,
    field: str | None = None,
) -> TokenizedPrompt:
    """Renders and tokenizes one conversation within `max_tokens`.

    `truncate="none"` raises InputTooLongError when over the limit. `truncate="left"` drops the oldest
    turns whole, then the oldest tokens of the last remaining turn, always keeping the system segment,
    at least one token of the scored assistant turn's end, and `<extra_id_2>`; it raises
    InputTooLongError when even that cannot fit. `field` names the input in the error (another API's term).
    """
    system_ids, turn_ids, end_ids = _encode_segments(messages, tokenizer)
    return _fit(system_ids, turn_ids, end_ids, max_tokens, truncate, conversation_index, field)


def tokenize_turns(
    messages: Sequence[Message],
    tokenizer: SentencePieceTokenizer,
    *,
    max_tokens: int,
    truncate: TruncateMode = "none",
    conversation_index: int = 0,
) -> list[tuple[int, TokenizedPrompt]]:
    """One prompt per assistant turn, as the reference annotator scores them: the conversation up to and
    including that turn, then `<extra_id_2>`. Returns `(message index, prompt)` in turn order. Each
    segment is encoded once; limits and truncation apply to each prefix as in `tokenize_conversation`."""
    system_ids, turn_ids, end_ids = _encode_segments(messages, tokenizer)
    offset = 1 if messages and messages[0].role == "system" else 0
    indices = [i for i, message in enumerate(messages) if message.role == "assistant"]
    # The last prefix is the whole conversation: fitting it first reports an over-long conversation with
    # its full token count, exactly as `turns: "last"` does.
    prompts = [
        (i, _fit(system_ids, turn_ids[: i - offset + 1], end_ids, max_tokens, truncate, conversation_index, None))
        for i in reversed(indices)
    ]
    return prompts[::-1]


def fit_token_ids(token_ids: Sequence[int], tokenizer: SentencePieceTokenizer, *, max_tokens: int) -> TokenizedPrompt:
    """Fits an already formatted prompt (the KServe/Triton route's input) into `max_tokens` the way
    `truncate="left"` fits a conversation, so the score is still read at the real `<extra_id_2>`: the
    prompt is split into its segments at the `<extra_id_1>` markers (what precedes the first is the system
    segment, a trailing `<extra_id_2>` the end), then older turns are dropped whole and the oldest tokens of
    the first kept turn cut. A system segment that leaves no room is dropped too; a prompt without markers
    keeps its last tokens. `truncated` is set when tokens were dropped."""
    ids = list(token_ids)
    if len(ids) <= max_tokens:
        return TokenizedPrompt(ids, truncated=False)
    end = ids[-1:] if ids[-1] == tokenizer.piece_id(END_MARKER) else []
    body = ids[: len(ids) - len(end)]
    turn_marker_id = tokenizer.piece_id(TURN_MARKER)
    starts = [i for i, token in enumerate(body) if token == turn_marker_id]
    if not starts or starts[0] + len(end) >= max_tokens:
        head, turns = [], [body]
    else:
        head = body[: starts[0]]
        turns = [body[a:b] for a, b in zip(starts, starts[1:] + [len(body)])]
    return _fit(head, turns, end, max_tokens, "left", 0, None)


def _encode_segments(
    messages: Sequence[Message], tokenizer: SentencePieceTokenizer
) -> tuple[list[int], list[list[int]], list[int]]:
    segments = render_segments(messages)
    return (
        tokenizer.encode(segments.system),
        [tokenizer.encode(turn) for turn in segments.turns],
        tokenizer.encode(segments.end),
    )


def _fit(
    system_ids: list[int],
    turn_ids: Sequence[list[int]],
    end_ids: list[int],
    max_tokens: int,
    truncate: TruncateMode,
    conversation_index: int,
    field: str | None,
) -> TokenizedPrompt:
    total = len(system_ids) + sum(len(ids) for ids in turn_ids) + len(end_ids)
    if total <= max_tokens:
        return TokenizedPrompt(_join(system_ids, turn_ids, end_ids), truncated=False)
    if truncate == "none":
        raise InputTooLongError(conversation_index, total, max_tokens, field=field)

    fixed = len(system_ids) + len(end_ids)
    room_for_turns = max_tokens - fixed
    if room_for_turns < 1:
        raise InputTooLongError(
            conversation_index,
            total,
            max_tokens,
            detail=f"truncate=left cannot fit it: the system prompt and end marker alone take {fixed} tokens",
            field=field,
        )
    kept = list(turn_ids)
    while len(kept) > 1 and sum(len(ids) for ids in kept) > room_for_turns:
        kept.pop(0)
    overflow = sum(len(ids) for ids in kept) - room_for_turns
    if overflow > 0:
        kept[0] = kept[0][overflow:]
    return TokenizedPrompt(_join(system_ids, kept, end_ids), truncated=True)


def _join(system_ids: list[int], turn_ids: Sequence[list[int]], end_ids: list[int]) -> list[int]:
    out = list(system_ids)
    for ids in turn_ids:
        out.extend(ids)
    out.extend(end_ids)
    return out


class SteerLMPrompt:
    """The SteerLM template with a SentencePiece tokenizer (NeMo checkpoints), behind the same methods as
    `deployments.chat_template.ChatTemplatePrompt` (HF checkpoints) so the router serves either."""

    def __init__(self, tokenizer: SentencePieceTokenizer):
        self.tokenizer = tokenizer
        self.encode = tokenizer.encode
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id

    def tokenize_conversation(self, messages: Sequence[Message], **kwargs: Any) -> TokenizedPrompt:
        return tokenize_conversation(messages, self.tokenizer, **kwargs)

    def tokenize_turns(self, messages: Sequence[Message], **kwargs: Any) -> list[tuple[int, TokenizedPrompt]]:
        return tokenize_turns(messages, self.tokenizer, **kwargs)

    def fit_token_ids(self, token_ids: Sequence[int], *, max_tokens: int) -> TokenizedPrompt:
        return fit_token_ids(token_ids, self.tokenizer, max_tokens=max_tokens)

    def complete_rendered(self, text: str) -> str:
        """An already rendered prompt, ended the way the template ends a conversation: the scored turn's
        closing newline and `<extra_id_2>` (where the score is read) are appended when missing."""
        if text.endswith(END_MARKER):
            return text
        return text + ("" if text.endswith("\n") else "\n") + END_MARKER
