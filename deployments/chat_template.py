"""Prompts for HF reward models: the checkpoint's own Jinja chat template and its `tokenizer.json`.

Rendering follows what transformers' `apply_chat_template(messages, tokenize=True)` does for a reward
model: a sandboxed Jinja environment with `trim_blocks`/`lstrip_blocks` and loop controls, the tokenizer's
special tokens as variables, no generation prompt, and encoding without adding special tokens (the
template writes BOS itself). The score is read at the last token of the rendered conversation.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from deployments.errors import InputTooLongError
from deployments.prompt import SentencePieceTokenizer, SteerLMPrompt, TokenizedPrompt


SHARED_CUT_WINDOW_CHARS = 4096  # how far back from the end of a best-of-N's shared text a special token is looked for


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class ChatTemplatePrompt:
    """Renders and tokenizes conversations for an HF checkpoint (`sharding.checkpoints.hf.HFCheckpoint`)."""

    def __init__(self, tokenizer_path: str, template: str, special_tokens: dict[str, str | None]):
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(template)
        self._special = {k: v for k, v in special_tokens.items() if v is not None}
        eos = self._special.get("eos_token")
        self.eos_id = self._tokenizer.token_to_id(eos) if eos else None
        self.assistant_header = self._assistant_header()
        self._special_texts = sorted({t.content for t in self._tokenizer.get_added_tokens_decoder().values()
                                      if t.special and t.content})

    def _assistant_header(self) -> str | None:
        """What the template writes before an assistant message's text (how the first response starts in a
        rendered prompt: prefix affinity of rendered prompts); None when a lone user turn and the same turn
        followed by an answer do not render as prefix and extension."""
        user = {"role": "user", "content": "QUESTION"}
        answer = "ANSWER"
        try:
            question = self._template.render(messages=[user], add_generation_prompt=False, **self._special)
            both = self._template.render(messages=[user, {"role": "assistant", "content": answer}],
                                         add_generation_prompt=False, **self._special)
        except jinja2.exceptions.TemplateError:
            return None
        if not both.startswith(question) or answer not in both[len(question):]:
            return None
        turn = both[len(question):]
        return turn[: turn.index(answer)].strip() or None

    @classmethod
    def for_checkpoint(cls, checkpoint) -> ChatTemplatePrompt:
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        return cls(str(checkpoint.tokenizer_path), checkpoint.chat_template,
                   {name: checkpoint.special_token(name) for name in names})

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def render(self, messages: Sequence[Any]) -> str:
        plain = [{"role": m.role, "content": m.content} for m in messages]
        return self._template.render(messages=plain, add_generation_prompt=False, **self._special)

    def tokenize_conversation(self, messages: Sequence[Any], *, max_tokens: int, truncate: str = "none",
                              conversation_index: int = 0, field: str | None = None) -> TokenizedPrompt:
        """`truncate="left"` drops the oldest non-system messages (in user/assistant pairs where possible)
        until the rendered conversation fits; the scored last turn is never cut."""
        ids = self.encode(self.render(messages))
        if len(ids) <= max_tokens:
            return TokenizedPrompt(ids, truncated=False)
        if truncate == "none":
            raise InputTooLongError(conversation_index, len(ids), max_tokens, field=field)
        system = [m for m in messages[:1] if m.role == "system"]
        rest = list(messages[len(system):])
        starts, start = [], 0  # where the kept messages start after each drop step, in drop order
        while len(rest) - start > 1:
            start += 2 if len(rest) - start > 2 and rest[start].role == "user" else 1
            starts.append(start)
        # Fewer messages render to fewer tokens: binary search for the first step that fits (O(tokens log
        # turns), where re-rendering after every step was O(tokens x turns)).
        low, high, best = 0, len(starts) - 1, None
        while low <= high:
            middle = (low + high) // 2
            kept = self.encode(self.render(system + rest[starts[middle]:]))
            if len(kept) <= max_tokens:
                best, high = kept, middle - 1
            else:
                low = middle + 1
        if best is not None:
            return TokenizedPrompt(best, truncated=True)
        raise InputTooLongError(conversation_index, len(ids), max_tokens, field=field,
                                detail="truncate=left cannot fit it: the last turn alone is over the limit")

    def tokenize_best_of_n(self, prompt: Sequence[Any], responses: Sequence[str], *, max_tokens: int,
                           truncate: str = "none") -> list[TokenizedPrompt]:
        """One prompt per response, the shared prompt encoded once where that is exact. Each conversation is
        rendered (a Jinja template owes nothing to prefixes, so the shared text is found in the rendered
        strings: their common prefix). It is cut after its last special token that some common text follows;
        the text before the cut is encoded once, each conversation's rest alone. The tokenizer splits special
        tokens off before anything else, so the pieces are encoded as in the whole text, except for what a
        pre-tokenizer does to the first piece of an input (a prepended space), which depends only on that
        piece's first character, common to every conversation: so the first conversation is also encoded whole
        and the cut is kept only when both encodings agree. Otherwise, and for a conversation over the limit
        with `truncate: "left"`, a conversation is rendered and encoded whole."""
        from deployments.schemas import Message

        conversations = [[*prompt, Message(role="assistant", content=response)] for response in responses]

        first: list[int] | None = None

        def alone(index: int) -> TokenizedPrompt:
            if index == 0 and first is not None and len(first) <= max_tokens:
                return TokenizedPrompt(first, truncated=False)
            return self.tokenize_conversation(conversations[index], max_tokens=max_tokens, truncate=truncate,
                                              conversation_index=index, field=f"responses[{index}]")

        if len(conversations) < 2:
            return [alone(index) for index in range(len(conversations))]
        texts = [self.render(conversation) for conversation in conversations]
        first = self.encode(texts[0])
        if len(first) > max_tokens and truncate == "none":
            raise InputTooLongError(0, len(first), max_tokens, field="responses[0]")
        cut = self._shared_cut(texts)
        head = self.encode(texts[0][:cut]) if cut else []
        if not cut or head + self.encode(texts[0][cut:]) != first:
            return [alone(index) for index in range(len(conversations))]
        out = []
        for index, text in enumerate(texts):
            ids = first if index == 0 else head + self.encode(text[cut:])
            if len(ids) <= max_tokens:
                out.append(TokenizedPrompt(ids, truncated=False))
            elif truncate == "none":
                raise InputTooLongError(index, len(ids), max_tokens, field=f"responses[{index}]")
            else:
                out.append(alone(index))
        return out

    def _shared_cut(self, texts: Sequence[str]) -> int:
        """Where the rendered texts' common prefix can be cut: just after the last special token that ends
        before it does (0: none), searched in its last SHARED_CUT_WINDOW_CHARS characters."""
        shared = len(os.path.commonprefix([min(texts), max(texts)]))
        if shared < 2:
            return 0
        window = max(0, shared - SHARED_CUT_WINDOW_CHARS)
        cut = 0
        for token in self._special_texts:
            at = texts[0].rfind(token, window, shared - 1)  # the token ends before the shared text does
            if at >= 0:
                cut = max(cut, at + len(token))
        return cut

    def tokenize_turns(self, messages: Sequence[Any], **kwargs: Any) -> list[tuple[int, TokenizedPrompt]]:
        """One prompt per assistant turn: the conversation rendered up to and including that turn. The whole
        conversation is rendered and encoded first (an over-long one is refused after one encoding). A turn
        whose rendering is a prefix of the whole's ending with a special token takes the whole's tokens up to
        there: the tokenizer splits special tokens off before anything else, so the text before one encodes as
        it would alone. Any other turn (a template that renders earlier turns differently), and one over the
        limit, is rendered and encoded alone, as `tokenize_conversation` does."""
        indices = [i for i, message in enumerate(messages) if message.role == "assistant"]
        if not indices:
            return []
        max_tokens = kwargs["max_tokens"]
        full = self.render(messages[: indices[-1] + 1])
        encoding = self._tokenizer.encode(full, add_special_tokens=False)
        ends = [end for _, end in encoding.offsets]
        if len(encoding.ids) > max_tokens and kwargs.get("truncate", "none") == "none":
            raise InputTooLongError(kwargs.get("conversation_index", 0), len(encoding.ids), max_tokens,
                                    field=kwargs.get("field"))
        prompts = []
        for i in reversed(indices):
            text = full if i == indices[-1] else self.render(messages[: i + 1])
            n = len(encoding.ids) if text is full else self._prefix_tokens(full, text, ends)
            if n is not None and n <= max_tokens:
                prompts.append((i, TokenizedPrompt(encoding.ids[:n], truncated=False)))
            else:
                prompts.append((i, self.tokenize_conversation(messages[: i + 1], **kwargs)))
        return prompts[::-1]

    def _prefix_tokens(self, full: str, text: str, ends: Sequence[int]) -> int | None:
        """How many of `full`'s tokens (`ends`: their end offsets) encode `text`, when `text` is a prefix of
        `full` ending with a special token that is a token of `full`'s encoding; None otherwise."""
        if not full.startswith(text) or not any(text.endswith(token) for token in self._special_texts):
            return None
        n = bisect.bisect_right(ends, len(text))
        return n if n and ends[n - 1] == len(text) else None

    def fit_token_ids(self, token_ids: Sequence[int], *, max_tokens: int) -> TokenizedPrompt:
        """A pre-formatted prompt over the limit keeps its last `max_tokens` tokens (the scored end)."""
        ids = list(token_ids)
        return TokenizedPrompt(ids[-max_tokens:], truncated=len(ids) > max_tokens)


    def complete_rendered(self, text: str) -> str:
        """An already rendered prompt as it is: a chat template has no end marker; the score is read at
        its last token."""
        return text


def prompt_format_for(checkpoint) -> ChatTemplatePrompt | SteerLMPrompt:
    """The checkpoint's prompt format: its own chat template (HF) or the SteerLM template (NeMo)."""
    if checkpoint.arch.tokenizer.library == "huggingface":
        return ChatTemplatePrompt.for_checkpoint(checkpoint)
    return SteerLMPrompt(SentencePieceTokenizer(checkpoint.tokenizer_path))
