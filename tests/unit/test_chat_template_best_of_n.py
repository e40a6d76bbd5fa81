"""HF chat-template best-of-N and per-turn prompts: the shared text is encoded once where that is exact, and
every prompt equals its conversation rendered and encoded whole (the reference), with a byte-level tokenizer
(best-of-N's cut kept) and a Metaspace one whose first piece of an input gets a prepended "▁" (best-of-N's
cut refused, each conversation whole; per-turn prefixes start where the whole does, so they are exact)."""

from __future__ import annotations

import random

import pytest

from deployments.chat_template import ChatTemplatePrompt
from deployments.errors import InputTooLongError
from deployments.schemas import Message

WORDS = "the model scores each answer by its helpfulness and correctness while verbosity costs a little".split()


class CountingTokenizer:
    """Wraps a `tokenizers.Tokenizer`: counts the characters of every text encoded."""

    def __init__(self, inner):
        self.inner, self.chars, self.calls = inner, 0, 0

    def encode(self, text, **kwargs):
        self.chars += len(text)
        self.calls += 1
        return self.inner.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def byte_level(hf_chat_prompt):
    return hf_chat_prompt


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.hf_models import CHAT_TEMPLATE, SPECIAL

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(vocab_size=300,
                                                                       special_tokens=["<unk>", *SPECIAL]))
    path = tmp_path_factory.mktemp("metaspace") / "tokenizer.json"
    tok.save(str(path))
    return ChatTemplatePrompt(str(path), CHAT_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def whole(prompt: ChatTemplatePrompt, messages, responses, **kwargs):
    return [prompt.tokenize_conversation([*messages, Message(role="assistant", content=r)], conversation_index=i,
                                         field=f"responses[{i}]", **kwargs) for i, r in enumerate(responses)]


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
def test_every_prompt_equals_its_conversation_encoded_whole(name, request):
    prompt = request.getfixturevalue(name)
    rng = random.Random(0)
    for case in range(12):
        messages = [Message(role="system", content=text(rng, 5))] if case % 3 == 0 else []
        messages += [Message(role="user", content=text(rng, rng.randrange(1, 60)))]
        if case % 4 == 1:
            messages += [Message(role="assistant", content=text(rng, 7)), Message(role="user", content="why?")]
        shared = text(rng, rng.randrange(0, 4))  # responses that start alike
        responses = [(shared + " " + text(rng, rng.randrange(1, 20))).strip() for _ in range(rng.randrange(1, 9))]
        responses += ["  spaced", "<|eot_id|> a special token in the text", "x"]
        got = prompt.tokenize_best_of_n(messages, responses, max_tokens=10**6)
        assert [p.token_ids for p in got] == [p.token_ids for p in whole(prompt, messages, responses,
                                                                          max_tokens=10**6)], case


def test_the_shared_prompt_is_encoded_once(byte_level, monkeypatch):
    """A ~1 MB prompt x 40 responses: the tokenizer reads the prompt twice (the first conversation whole, the
    shared text once), not 40 times."""
    rng = random.Random(1)
    counting = CountingTokenizer(byte_level._tokenizer)
    monkeypatch.setattr(byte_level, "_tokenizer", counting)
    messages = [Message(role="user", content=text(rng, 150_000))]
    prompt_chars = len(messages[0].content)
    assert prompt_chars > 900_000
    responses = [text(rng, 30) for _ in range(40)]
    got = byte_level.tokenize_best_of_n(messages, responses, max_tokens=10**7)
    assert counting.chars < 2 * prompt_chars + 40 * 1000, (counting.chars, prompt_chars)
    monkeypatch.setattr(byte_level, "_tokenizer", counting.inner)
    for i in (0, 39):  # the reference, for two (each whole encode reads the whole prompt)
        want = whole(byte_level, messages, [responses[i]], max_tokens=10**7)[0]
        assert got[i].token_ids == want.token_ids


def test_the_metaspace_cut_is_refused_so_each_conversation_is_encoded_whole(metaspace, monkeypatch):
    counting = CountingTokenizer(metaspace._tokenizer)
    monkeypatch.setattr(metaspace, "_tokenizer", counting)
    messages = [Message(role="user", content="the model " * 50)]
    metaspace.tokenize_best_of_n(messages, ["a", "b", "c"], max_tokens=10**6)
    # The first conversation whole, the shared text and the first rest (the check that fails), then the other
    # two whole: every conversation's full text was read.
    assert counting.chars > 3 * len(messages[0].content)


def test_limits_name_the_response(byte_level):
    messages = [Message(role="user", content="the model scores")]
    short, long = "a", " ".join(["helpfulness"] * 200)
    limit = whole(byte_level, messages, [short], max_tokens=10**6)[0].num_tokens + 5
    with pytest.raises(InputTooLongError) as raised:
        byte_level.tokenize_best_of_n(messages, [short, long], max_tokens=limit)
    assert "responses[1]" in str(raised.value)
    with pytest.raises(InputTooLongError) as raised:
        byte_level.tokenize_best_of_n(messages, [long, short], max_tokens=limit)
    assert "responses[0]" in str(raised.value)
    with pytest.raises(InputTooLongError, match="responses\\[1\\]"):  # its last turn alone is over the limit
        byte_level.tokenize_best_of_n(messages, [short, long], max_tokens=limit, truncate="left")


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
def test_every_turn_equals_its_prefix_encoded_whole(name, request):
    prompt = request.getfixturevalue(name)
    rng = random.Random(2)
    for case in range(10):
        messages = [Message(role="system", content=text(rng, 4))] if case % 2 else []
        for turn in range(rng.randrange(1, 6)):
            messages += [Message(role="user", content=text(rng, rng.randrange(1, 30)) + " ünïcode ✓"),
                         Message(role="assistant", content=text(rng, rng.randrange(1, 30)))]
        got = prompt.tokenize_turns(messages, max_tokens=10**6)
        want = [(i, prompt.tokenize_conversation(messages[: i + 1], max_tokens=10**6))
                for i, m in enumerate(messages) if m.role == "assistant"]
        assert [(i, p.token_ids) for i, p in got] == [(i, p.token_ids) for i, p in want], case


def test_turns_encode_the_conversation_once(byte_level, monkeypatch):
    rng = random.Random(3)
    messages = []
    for _ in range(20):
        messages += [Message(role="user", content=text(rng, 500)), Message(role="assistant", content=text(rng, 50))]
    counting = CountingTokenizer(byte_level._tokenizer)
    monkeypatch.setattr(byte_level, "_tokenizer", counting)
    got = byte_level.tokenize_turns(messages, max_tokens=10**6)
    assert len(got) == 20 and counting.calls == 1
    full = got[-1][1].num_tokens
    with pytest.raises(InputTooLongError, match=str(full)):  # over the limit: refused after that one encoding
        byte_level.tokenize_turns(messages, max_tokens=full - 1)
    assert counting.calls == 2
    short = byte_level.tokenize_turns(messages, max_tokens=full - 1, truncate="left")  # the last turn cut alone
    assert short[-1][1].truncated and [p.token_ids for _, p in short[:-1]] == [p.token_ids for _, p in got[:-1]]


def test_no_cut_when_the_rendered_conversations_share_nothing(hf_tokenizer_path):
    """A template that writes the response first: the rendered texts share no prefix, so nothing is cut (a
    search bounded by a shared length of 0 must not look through the whole text)."""
    template = "{% for m in messages|reverse %}{{ m['content'] + '<|eot_id|>' }}{% endfor %}"
    prompt = ChatTemplatePrompt(hf_tokenizer_path, template, {"eos_token": "<|eot_id|>"})
    messages = [Message(role="user", content="the model scores")]
    responses = ["answer one", "second answer"]
    assert prompt._shared_cut([prompt.render([*messages, Message(role="assistant", content=r)])
                               for r in responses]) == 0
    got = prompt.tokenize_best_of_n(messages, responses, max_tokens=10**6)
    assert [p.token_ids for p in got] == [p.token_ids for p in whole(prompt, messages, responses, max_tokens=10**6)]
