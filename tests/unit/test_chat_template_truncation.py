"""HF chat-template prompts: `truncate: left` finds the fewest dropped messages by binary search, which
equals dropping them one step at a time (the rule before), and refuses impossible fits."""

from __future__ import annotations

import pytest

from deployments.errors import InputTooLongError
from deployments.schemas import Message


@pytest.fixture
def prompt(hf_chat_prompt):
    return hf_chat_prompt


def linear_rule(prompt, messages, limit):
    system = [m for m in messages[:1] if m.role == "system"]
    rest = list(messages[len(system):])
    while len(rest) > 1:
        rest = rest[2:] if len(rest) > 2 and rest[0].role == "user" else rest[1:]
        kept = prompt.encode(prompt.render(system + rest))
        if len(kept) <= limit:
            return kept
    return None


def test_binary_search_equals_the_step_by_step_rule(prompt):
    messages = [Message(role="system", content="Be brief.")]
    for t in range(9):
        messages += [Message(role="user", content=f"question {t} " * (1 + t % 4)),
                     Message(role="assistant", content=f"answer {t} " * (2 + t % 3))]
    total = prompt.tokenize_conversation(messages, max_tokens=10**6).num_tokens
    for limit in range(total - 1, 5, -7):
        want = linear_rule(prompt, messages, limit)
        if want is None:
            with pytest.raises(InputTooLongError):
                prompt.tokenize_conversation(messages, max_tokens=limit, truncate="left")
        else:
            got = prompt.tokenize_conversation(messages, max_tokens=limit, truncate="left")
            assert got.truncated and got.token_ids == want


def test_the_assistant_header_is_what_the_template_writes_before_an_answer(prompt):
    """Prefix affinity of rendered prompts cuts a rendered conversation there (deployments/router_affinity.py)."""
    assert prompt.assistant_header == "<|start_header_id|>assistant<|end_header_id|>"
    rendered = prompt.render([Message(role="user", content="Hi"), Message(role="assistant", content="Hello")])
    assert rendered.index(prompt.assistant_header) > rendered.index("Hi")
