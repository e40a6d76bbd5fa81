"""The SteerLM reward prompt (NeMo-Aligner's template) and its tokenization with a token limit.

A conversation renders as a system segment, one segment per turn and the end marker:

    <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{text}\\n<extra_id_1>Assistant\\n{text}\\n<extra_id_2>

The model reads its score at the last token, `<extra_id_2>`. Tokenization is the reference server's: one
`SentencePieceProcessor.encode` of the whole rendered prompt, for any SentencePiece model (with or without
a dummy prefix, identity or NFKC normalization, byte fallback). The markers are user-defined pieces, which
SentencePiece never merges with their neighbours, so the turns' boundaries are the marker tokens that start
them, and the tokens before a marker do not depend on what follows it: the prompt of every prefix of a
conversation is a prefix of the conversation's tokens plus the end marker (`tokenize_turns` encodes each
conversation once), and truncation drops whole turns by index arithmetic. Fitting is O(tokens)
(`deployments.truncation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from deployments.schemas import Message
from deployments.truncation import (
    END_MARKER,
    ROLE_LABELS,
    SYSTEM_MARKER,
    TURN_MARKER,
    SegmentedPrompt,
    TokenizedPrompt,
    TruncateMode,
    fit_prompt,
    fit_token_ids as _fit_token_ids,
)

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
MARKERS = (SYSTEM_MARKER, TURN_MARKER, END_MARKER)


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
    """SentencePiece encoding without BOS/EOS, as the reference server encodes a rendered prompt.

    The chat markers must be user-defined pieces (one token each, never merged with their neighbours); a
    model that adds a dummy prefix gives it once, at the start of the prompt, as the reference does."""

    def __init__(self, model_path: str | Path):
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.model_path = Path(model_path)
        self.marker_ids = {marker: self._sp.piece_to_id(marker) for marker in MARKERS}
        system_ids = self.encode(SYSTEM_MARKER)
        self.dummy_prefix_ids = system_ids[:-1]  # [] or the dummy-prefix piece a whole-string encode starts with
        for marker, marker_id in self.marker_ids.items():
            alone = self.encode(marker)
            inside = self.encode(f"a{marker}b")
            if (marker_id == self._sp.unk_id() or alone != self.dummy_prefix_ids + [marker_id]
                    or inside.count(marker_id) != 1):
                raise ValueError(
                    f"tokenizer {model_path} does not encode {marker} as one piece of its own (got {alone} alone, "
                    f"{inside} inside text); the reward prompt needs its markers as single tokens"
                )
        self._header_ids = {role: self._stable_prefix(f"{TURN_MARKER}{label}\n") for role, label in ROLE_LABELS.items()}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def piece_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def encode(self, text: str) -> list[int]:
        """The whole-string encoding (the reference server's)."""
        return self._sp.encode(text, out_type=int)

    def encode_segment(self, segment: str) -> list[int]:
        """The tokens of `segment` (which starts with a marker) where it stands inside a prompt: followed by a
        marker, and without the dummy prefix that only the prompt's start gets."""
        return self.encode(segment + END_MARKER)[len(self.dummy_prefix_ids):-1]

    def header_ids(self, role: str) -> list[int]:
        """The tokens every `<extra_id_1>{Role}\\n{text}` segment starts with, whatever the text (with NFKC
        the newline is whitespace that joins the text's first piece)."""
        return self._header_ids[role]

    def _stable_prefix(self, header: str) -> list[int]:
        alone, followed = self.encode_segment(header), self.encode_segment(header + "x")
        length = 0
        while length < min(len(alone), len(followed)) and alone[length] == followed[length]:
            length += 1
        return alone[:length]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._sp.decode(list(token_ids))

    def segment_starts(self, text: str, ids: list[int], segment_lengths: Sequence[int]) -> list[int]:
        """Token index where each segment of `text` starts in its whole-string encoding `ids`. Each segment
        starts with a marker token; markers that a segment's own text contains are counted past. When the
        marker tokens do not add up (a normalization that makes a marker out of other characters), the
        pieces' byte offsets decide instead."""
        marker_ids = set(self.marker_ids.values())
        expected, offset = [], 0
        for length in segment_lengths:
            segment = text[offset:offset + length]
            expected.append(sum(segment.count(marker) for marker in MARKERS))
            offset += length
        positions = [i for i, token in enumerate(ids) if token in marker_ids]
        if len(positions) == sum(expected):
            starts, seen = [], 0
            for count in expected:
                starts.append(positions[seen])
                seen += count
            return starts
        return self._segment_starts_by_offsets(text, segment_lengths)

    def _segment_starts_by_offsets(self, text: str, segment_lengths: Sequence[int]) -> list[int]:
        pieces = self._sp.encode(text, return_type="proto").pieces
        starts, byte_offset, offset, index = [], 0, 0, 0
        for n, length in enumerate(segment_lengths):
            while n and index < len(pieces) and pieces[index].begin < byte_offset:
                index += 1
            starts.append(0 if n == 0 else index)
            byte_offset += len(text[offset:offset + length].encode("utf-8"))
            offset += length
        return starts

    def piece_offsets(self, segment: str) -> list[int]:
        """Byte offset in `segment` where each of `encode_segment(segment)`'s pieces begins."""
        pieces = self._sp.encode(segment + END_MARKER, return_type="proto").pieces
        return [piece.begin for piece in pieces][len(self.dummy_prefix_ids):-1]


class _EncodedConversation(SegmentedPrompt):
    """A conversation encoded once: its turns cut inside re-render their text (header, kept text, newline)."""

    def __init__(self, messages: Sequence[Message], tokenizer: SentencePieceTokenizer):
        segments = render_segments(messages)
        text = segments.text
        ids = tokenizer.encode(text)
        lengths = [len(segments.system), *map(len, segments.turns), len(segments.end)]
        starts = tokenizer.segment_starts(text, ids, lengths)
        turns = [m for m in messages if m.role != "system"]
        super().__init__(ids, starts[1:])
        self._tokenizer = tokenizer
        self._roles = [m.role for m in turns]
        self._contents = [m.content for m in turns]
        # Piece offsets of turns already cut, by turn index: fitting several prefixes (per-turn scoring) or
        # several responses to one prompt (best-of-N, which shares this dict) reads a long turn once.
        self._offsets: dict[int, list[int]] = {}
        self._cached_turns = len(turns)  # turns whose offsets may be kept in `_offsets`

    def _piece_offsets(self, index: int, segment: str) -> list[int]:
        offsets = self._offsets.get(index) if index < self._cached_turns else None
        if offsets is None:
            offsets = self._tokenizer.piece_offsets(segment)
            if index < self._cached_turns:
                self._offsets[index] = offsets
        return offsets

    def role(self, index: int) -> str:
        return self._roles[index]

    def cut_turn(self, index: int, budget: int) -> list[int] | None:
        tokenizer, role, content = self._tokenizer, self._roles[index], self._contents[index]
        header = f"{TURN_MARKER}{ROLE_LABELS[role]}\n"
        if budget < len(tokenizer.header_ids(role)) + 2:  # header, one token of text, the newline
            return None
        segment = f"{header}{content}\n"
        offsets = self._piece_offsets(index, segment)
        raw = segment.encode("utf-8")
        content_start, content_end = len(header.encode("utf-8")), len(raw) - 1
        keep = budget - len(tokenizer.header_ids(role))
        for _ in range(8):  # re-encoding the cut text can take a few tokens more than it kept: shrink and retry
            cut = max(content_start, offsets[max(0, len(offsets) - keep)])
            if not raw[cut:content_end].strip():  # nothing but whitespace would be left of the text
                return None
            ids = tokenizer.encode_segment(header + raw[cut:content_end].decode("utf-8") + "\n")
            if len(ids) <= budget:
                return ids
            keep -= len(ids) - budget
            if keep < 1:
                return None
        return None


class _JoinedIds:
    """`head + tail` without copying `head` (a long best-of-N prompt) for every response: slices and indexing
    read across the join (what `deployments.truncation.fit_prompt` needs)."""

    def __init__(self, head: list[int], tail: list[int]):
        self._head, self._tail = head, tail

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self._head)
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("only contiguous slices")
            return self._head[start:min(stop, n)] + self._tail[max(start - n, 0):max(stop - n, 0)]
        key = key + len(self) if key < 0 else key
        return self._head[key] if key < n else self._tail[key - n]


class _BestOfN:
    """A best-of-N prompt encoded once (one encode of the prompt, then one of each response's turn): response
    i's prompt is the prompt's tokens, its `<extra_id_1>Assistant\\n{response}\\n` turn and the end marker,
    exactly the whole-string encoding of the conversation (the markers are pieces of their own, so the tokens
    before one do not depend on what follows it). Tokenizing costs O(prompt + responses), not N x prompt."""

    def __init__(self, prompt: Sequence[Message], tokenizer: SentencePieceTokenizer):
        segments = render_segments(prompt)
        text = segments.system + "".join(segments.turns) + END_MARKER
        ids = tokenizer.encode(text)
        starts = tokenizer.segment_starts(text, ids, [len(segments.system), *map(len, segments.turns), len(END_MARKER)])
        self.prefix = ids[:starts[-1]]
        self.turn_starts = list(starts[1:-1])
        self.end = ids[starts[-1]:]
        turns = [m for m in prompt if m.role != "system"]
        self.roles = [m.role for m in turns]
        self.contents = [m.content for m in turns]
        self.tokenizer = tokenizer
        self.offsets: dict[int, list[int]] = {}  # the prompt turns' piece offsets, shared by every response

    def response(self, content: str) -> _EncodedConversation:
        turn = self.tokenizer.encode_segment(f"{TURN_MARKER}{ROLE_LABELS['assistant']}\n{content}\n")
        conversation = _EncodedConversation.__new__(_EncodedConversation)
        size = len(self.prefix)
        SegmentedPrompt.__init__(conversation, _JoinedIds(self.prefix, turn + self.end),
                                 [*self.turn_starts, size, size + len(turn)])
        conversation._tokenizer = self.tokenizer
        conversation._roles = [*self.roles, "assistant"]
        conversation._contents = [*self.contents, content]
        # A prompt turn cut for one response is cut from the same offsets for the next; the response's own
        # turn (index len(self.roles)) differs per response and is never kept.
        conversation._offsets, conversation._cached_turns = self.offsets, len(self.roles)
        return conversation


class _TokenPrompt(SegmentedPrompt):
    """An already formatted prompt's tokens (KServe): turns start at `<extra_id_1>`; a turn cut inside keeps
    its header tokens (`<extra_id_1>User\\n` / `<extra_id_1>Assistant\\n` when they are there)."""

    def __init__(self, ids: list[int], tokenizer: SentencePieceTokenizer):
        turn_id, end_id = tokenizer.piece_id(TURN_MARKER), tokenizer.piece_id(END_MARKER)
        end = len(ids) - 1 if ids and ids[-1] == end_id else len(ids)
        # numpy: a million turn markers make 8 MB of starts here, not 36 MB of Python ints
        super().__init__(ids, np.append(np.flatnonzero(np.asarray(ids, dtype=np.int64)[:end] == turn_id), end))
        self._headers = {role: tokenizer.header_ids(role) for role in ROLE_LABELS}

    def _header(self, index: int) -> tuple[str, int]:
        """(role, header tokens) of a turn, from its first tokens (looked at only for the turns fitting needs)."""
        a, b = self.turn_starts[index], self.turn_starts[index + 1]
        for role, header in self._headers.items():
            if a + len(header) < b and self.ids[a:a + len(header)] == header:
                return role, len(header)
        return "?", 1

    def role(self, index: int) -> str:
        return self._header(index)[0]

    def cut_turn(self, index: int, budget: int) -> list[int] | None:
        a, b = self.turn_starts[index], self.turn_starts[index + 1]
        header = self._header(index)[1]
        if budget < header + 1:
            return None
        return self.ids[a:a + header] + self.ids[max(a + header, b - (budget - header)):b]


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

    `truncate="none"` raises InputTooLongError when over the limit; `truncate="left"` fits it as
    `deployments.truncation.fit_prompt` says (system text, scored turn and its question kept whenever they
    fit) and raises InputTooLongError when even that cannot fit. `field` names the input in the error."""
    encoded = _EncodedConversation(messages, tokenizer)
    return fit_prompt(encoded, encoded.num_turns - 1, max_tokens, truncate, conversation_index, field)


def tokenize_turns(
    messages: Sequence[Message],
    tokenizer: SentencePieceTokenizer,
    *,
    max_tokens: int,
    truncate: TruncateMode = "none",
    conversation_index: int = 0,
) -> list[tuple[int, TokenizedPrompt]]:
    """One prompt per assistant turn, as the reference annotator scores them: the conversation up to and
    including that turn, then `<extra_id_2>`. Returns `(message index, prompt)` in turn order. The
    conversation is encoded once; limits and truncation apply to each prefix as in `tokenize_conversation`."""
    encoded = _EncodedConversation(messages, tokenizer)
    offset = 1 if messages and messages[0].role == "system" else 0
    indices = [i for i, message in enumerate(messages) if message.role == "assistant"]
    # The last prefix is the whole conversation: fitting it first reports an over-long conversation with
    # its full token count, exactly as `turns: "last"` does.
    prompts = [(i, fit_prompt(encoded, i - offset, max_tokens, truncate, conversation_index, None))
               for i in reversed(indices)]
    return prompts[::-1]


def tokenize_best_of_n(
    prompt: Sequence[Message],
    responses: Sequence[str],
    tokenizer: SentencePieceTokenizer,
    *,
    max_tokens: int,
    truncate: TruncateMode = "none",
) -> list[TokenizedPrompt]:
    """One prompt per response (the prompt, then that assistant reply), as `tokenize_conversation` gives each
    conversation, with the prompt encoded once; limits and truncation apply to each as there, an over-long
    one named `responses[i]`."""
    encoded = _BestOfN(prompt, tokenizer)
    out = []
    for index, response in enumerate(responses):
        conversation = encoded.response(response)
        out.append(fit_prompt(conversation, conversation.num_turns - 1, max_tokens, truncate, index,
                              f"responses[{index}]"))
    return out


def fit_token_ids(token_ids: Sequence[int], tokenizer: SentencePieceTokenizer, *, max_tokens: int) -> TokenizedPrompt:
    """Fits an already formatted prompt (the KServe/Triton route's input) into `max_tokens` as
    `truncate="left"` fits a conversation, so the score is still read at the real `<extra_id_2>`: what
    precedes the first `<extra_id_1>` is the system segment, a trailing `<extra_id_2>` the end, each
    `<extra_id_1>` starts a turn. When that cannot fit (no markers, or a system segment that leaves no
    room), the prompt keeps its last `max_tokens` tokens. `truncated` is set when tokens were dropped."""
    return _fit_token_ids(_TokenPrompt(list(token_ids), tokenizer), max_tokens)


class SteerLMPrompt:
    """The SteerLM template with a SentencePiece tokenizer (NeMo checkpoints), behind the same methods as
    `deployments.chat_template.ChatTemplatePrompt` (HF checkpoints) so the router serves either."""

    def __init__(self, tokenizer: SentencePieceTokenizer):
        self.tokenizer = tokenizer
        self.encode = tokenizer.encode
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        # Where the first assistant turn starts in a rendered prompt (prefix affinity of rendered prompts).
        self.assistant_header = f"{TURN_MARKER}{ROLE_LABELS['assistant']}\n"

    def tokenize_conversation(self, messages: Sequence[Message], **kwargs: Any) -> TokenizedPrompt:
        return tokenize_conversation(messages, self.tokenizer, **kwargs)

    def tokenize_turns(self, messages: Sequence[Message], **kwargs: Any) -> list[tuple[int, TokenizedPrompt]]:
        return tokenize_turns(messages, self.tokenizer, **kwargs)

    def tokenize_best_of_n(self, prompt: Sequence[Message], responses: Sequence[str], **kwargs: Any
                           ) -> list[TokenizedPrompt]:
        return tokenize_best_of_n(prompt, responses, self.tokenizer, **kwargs)

    def fit_token_ids(self, token_ids: Sequence[int], *, max_tokens: int) -> TokenizedPrompt:
        return fit_token_ids(token_ids, self.tokenizer, max_tokens=max_tokens)

    def complete_rendered(self, text: str) -> str:
        """An already rendered prompt, ended the way the template ends a conversation: the scored turn's
        closing newline and `<extra_id_2>` (where the score is read) are appended when missing."""
        if text.endswith(END_MARKER):
            return text
        return text + ("" if text.endswith("\n") else "\n") + END_MARKER
