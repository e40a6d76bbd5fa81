"""Tokenization equals the reference's whole-string `SentencePieceProcessor.encode` for SentencePiece models
with the library's defaults (dummy prefix, NFKC, whitespace folding, here with byte fallback) as well as
for the demo tokenizer; and the left-truncation policy on every boundary, in O(tokens)."""

from __future__ import annotations

import io
import time

import pytest
import sentencepiece as spm

from deployments.errors import InputTooLongError
from deployments.prompt import (
    SentencePieceTokenizer,
    fit_token_ids,
    render_prompt,
    render_segments,
    tokenize_best_of_n,
    tokenize_conversation,
    tokenize_turns,
)
from deployments.schemas import Message
from demo.tokenizer import CORPUS_PATH

MARKERS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]


def train_default_tokenizer(path, model_type: str):
    """The library's defaults (nmt_nfkc, add_dummy_prefix, remove_extra_whitespaces) plus the chat markers as
    user-defined symbols and byte fallback."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(CORPUS_PATH), model_writer=model, model_type=model_type,
                                   vocab_size=800, byte_fallback=True, user_defined_symbols=MARKERS,
                                   num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


@pytest.fixture(scope="module", params=["demo", "default-unigram", "default-bpe"])
def tokenizer(request, demo_tokenizer, tmp_path_factory):
    if request.param == "demo":
        return demo_tokenizer
    return train_default_tokenizer(tmp_path_factory.mktemp("sp") / "t.model", request.param.split("-")[1])


def msgs(*pairs):
    return [Message(role=role, content=content) for role, content in pairs]


TRICKY = [
    msgs(("user", "  leading spaces"), ("assistant", "trailing spaces   ")),
    msgs(("system", "  Sys  with   gaps \n"), ("user", "\n\nnewlines first\n\n"), ("assistant", "tabs\tand\r\nCRLF\n")),
    msgs(("user", "unicode: café, naïve, 東京, Ελληνικά, emoji 🙂👍🏽, ZWJ 👩‍👩‍👧"), ("assistant", "ﬁ ﬂ Ａｂｃ ① ㎏ ½ ™")),
    msgs(("user", " "), ("assistant", "\n")),
    msgs(("user", "literal markers <extra_id_1>User\n and <extra_id_2> inside"), ("assistant", "<extra_id_0>x")),
    msgs(("user", "fullwidth ＜extra_id_1＞ normalizes"), ("assistant", "combining e\u0301 and \u00a0nbsp\u2003em")),
    msgs(("user", "q1"), ("assistant", "a1 "), ("user", " q2"), ("assistant", "a2\n\n"), ("user", "q3"),
         ("assistant", "done.")),
]


@pytest.mark.parametrize("messages", TRICKY, ids=range(len(TRICKY)))
def test_tokenization_equals_whole_string_encode(tokenizer, messages):
    whole = tokenizer.encode(render_prompt(messages))
    assert tokenize_conversation(messages, tokenizer, max_tokens=100_000).token_ids == whole
    for index, prompt in tokenize_turns(messages, tokenizer, max_tokens=100_000):
        assert prompt.token_ids == tokenizer.encode(render_prompt(messages[: index + 1]))


def test_default_tokenizer_has_a_dummy_prefix_and_is_served(tmp_path):
    tokenizer = train_default_tokenizer(tmp_path / "t.model", "unigram")
    assert tokenizer.dummy_prefix_ids  # `<extra_id_0>` alone encodes as ['▁', '<extra_id_0>']
    ids = tokenize_conversation(TRICKY[0], tokenizer, max_tokens=4096).token_ids
    assert ids[: len(tokenizer.dummy_prefix_ids) + 1] == tokenizer.dummy_prefix_ids + [tokenizer.piece_id(MARKERS[0])]
    assert ids[-1] == tokenizer.piece_id(MARKERS[2])


# --- left truncation on every boundary ----------------------------------------------------------------


def conversation():
    return msgs(("system", "Short system."),
                ("user", "first question " * 20), ("assistant", "first answer " * 20),
                ("user", "second question " * 20), ("assistant", "second answer " * 20),
                ("user", QUESTION), ("assistant", ANSWER))


QUESTION = " ".join(["the scored question is this one"] * 4)
ANSWER = " ".join(["the final scored answer ends here"] * 6)


def parts(tokenizer, messages):
    """Tokens of the system segment, each turn and the end as they stand in the whole-string encoding."""
    segments = render_segments(messages)
    whole = tokenizer.encode(segments.text)
    system = tokenizer.encode(segments.system + "<extra_id_2>")[:-1]
    turns = [tokenizer.encode_segment(t) for t in segments.turns]
    end = [tokenizer.piece_id("<extra_id_2>")]
    assert system + [t for turn in turns for t in turn] + end == whole
    return system, turns, end


def fit(tokenizer, messages, limit):
    return tokenize_conversation(messages, tokenizer, max_tokens=limit, truncate="left")


def test_whole_older_turns_go_first_oldest_first(tokenizer):
    messages = conversation()
    system, turns, end = parts(tokenizer, messages)
    total = len(system) + sum(map(len, turns)) + len(end)
    assert fit(tokenizer, messages, total).truncated is False
    for dropped in range(1, 4):  # exactly room for turns[dropped:], then one token less (4: the question is cut)
        limit = len(system) + sum(map(len, turns[dropped:])) + len(end)
        result = fit(tokenizer, messages, limit)
        assert result.truncated and result.token_ids == system + sum(turns[dropped:], []) + end
        result = fit(tokenizer, messages, limit - 1)
        assert result.token_ids == system + sum(turns[dropped + 1:], []) + end


def test_question_is_cut_inside_with_its_header_before_the_scored_turn(tokenizer):
    messages = conversation()
    system, turns, end = parts(tokenizer, messages)
    question, scored = turns[-2], turns[-1]
    header = tokenizer.header_ids("user")
    protected = len(system) + len(question) + len(scored) + len(end)
    for limit in range(protected - 1, protected - len(question) + len(header) + 1, -1):
        result = fit(tokenizer, messages, limit)
        assert result.truncated and result.num_tokens <= limit
        ids = result.token_ids
        assert ids[: len(system)] == system and ids[len(system):][: len(header)] == header
        assert ids[-len(scored) - len(end):] == scored + end  # the scored turn whole
        kept = tokenizer.decode(ids[len(system) + len(header): -len(scored) - len(end)]).strip()
        assert kept and QUESTION.endswith(kept)  # the question's end, under its re-rendered header
    # No room for the question's header and one token of text beside the newline: the question goes.
    limit = len(system) + len(scored) + len(end) + len(header) + 1
    assert fit(tokenizer, messages, limit).token_ids == system + scored + end


def test_scored_turn_is_cut_last_and_keeps_its_header_and_end(tokenizer):
    messages = conversation()
    system, turns, end = parts(tokenizer, messages)
    scored, header = turns[-1], tokenizer.header_ids("assistant")
    fixed = len(system) + len(end)
    for limit in (fixed + len(scored) - 1, fixed + len(scored) // 2, fixed + len(header) + 4):
        result = fit(tokenizer, messages, limit)
        ids = result.token_ids
        assert result.truncated and result.num_tokens <= limit
        assert ids[: len(system)] == system and ids[len(system):][: len(header)] == header and ids[-1:] == end
        kept = tokenizer.decode(ids[len(system) + len(header): -len(end)]).strip()
        assert kept and ANSWER.endswith(kept)
    for limit in (fixed + len(header) + 1, fixed, fixed - 1, 1):
        with pytest.raises(InputTooLongError) as info:
            fit(tokenizer, messages, limit)
        assert "truncate=left cannot fit it" in info.value.message and info.value.limit_tokens == limit


def test_no_question_before_the_scored_turn(demo_tokenizer):
    messages = msgs(("user", "q " * 30), ("assistant", "a " * 30), ("assistant", "final answer"))
    system, turns, end = parts(demo_tokenizer, messages)
    limit = len(system) + len(turns[-1]) + len(end)
    assert fit(demo_tokenizer, messages, limit).token_ids == system + turns[-1] + end


def test_turns_all_fits_each_prefix_with_the_same_policy(tokenizer):
    messages = conversation()
    system, turns, end = parts(tokenizer, messages)
    limit = len(system) + len(turns[2]) + len(turns[3]) + len(end) - 3
    for index, prompt in tokenize_turns(messages, tokenizer, max_tokens=limit, truncate="left"):
        assert prompt.token_ids == fit(tokenizer, messages[: index + 1], limit).token_ids


def test_truncation_is_linear_in_tokens(demo_tokenizer):
    """The issue's reproducer: 100k tiny turns, truncate left, turns all (was cubic). Kept small here: the
    speed target lives in bench/abuse.py; this checks doubling the input about doubles the time."""
    def run(turns: int) -> float:
        messages = msgs(*[(("user", "q"), ("assistant", "a"))[t % 2] for t in range(turns)])
        started = time.perf_counter()
        prompts = tokenize_turns(messages, demo_tokenizer, max_tokens=64, truncate="left")
        assert len(prompts) == turns // 2 and all(p.num_tokens <= 64 for _, p in prompts)
        return time.perf_counter() - started

    run(2000)
    small, large = min(run(4000) for _ in range(2)), min(run(16000) for _ in range(2))
    assert large < 12 * small  # 4x the input; quadratic would be ~16x


# --- KServe: already formatted token ids ---------------------------------------------------------------


def test_fit_token_ids_keeps_headers_and_question(tokenizer):
    messages = conversation()
    ids = tokenizer.encode(render_prompt(messages))
    system, turns, end = parts(tokenizer, messages)
    for dropped in range(1, 5):
        limit = len(system) + sum(map(len, turns[dropped:])) + len(end)
        assert fit_token_ids(ids, tokenizer, max_tokens=limit).token_ids == system + sum(turns[dropped:], []) + end
    question, scored = turns[-2], turns[-1]
    limit = len(system) + len(question) + len(scored) + len(end) - 5
    fitted = fit_token_ids(ids, tokenizer, max_tokens=limit)
    header = tokenizer.header_ids("user")
    assert fitted.truncated and fitted.num_tokens == limit
    assert fitted.token_ids == system + question[: len(header)] + question[len(header) + 5:] + scored + end
    plain = tokenizer.encode("no markers at all " * 20)
    assert fit_token_ids(plain, tokenizer, max_tokens=10).token_ids == plain[-10:]


def test_fit_token_ids_is_linear_on_marker_floods(demo_tokenizer):
    """32k and 1M ids all equal to `<extra_id_1>` (16.6 s and > 60 s before)."""
    marker = demo_tokenizer.piece_id("<extra_id_1>")
    started = time.perf_counter()
    for n in (32_000, 1_000_000):
        fitted = fit_token_ids([marker] * n, demo_tokenizer, max_tokens=4096)
        assert fitted.truncated and fitted.num_tokens <= 4096
    assert time.perf_counter() - started < 10  # generous: ~1 s here; a correctness guard, not a benchmark


BEST_OF_N = [m for m in TRICKY if len(m) >= 2 and m[-2].role == "user"]


@pytest.mark.parametrize("messages", BEST_OF_N)
def test_best_of_n_encodes_the_prompt_once_and_equals_each_conversation(tokenizer, messages):
    """`tokenize_best_of_n` (the prompt encoded once, then each response's turn) gives every response the
    tokens `tokenize_conversation` gives the whole conversation, within the limit and truncated; the prompt's
    text goes through the tokenizer once, whatever N."""
    responses = [messages[-1].content, "short", " spaced  out ", "ﬁ ① ½ <extra_id_1>x", "z " * 40]
    prompt = messages[:-1]
    calls = []
    encode = tokenizer.encode
    tokenizer.encode = lambda text: calls.append(text) or encode(text)
    try:
        got = tokenize_best_of_n(prompt, responses, tokenizer, max_tokens=100_000)
        prompt_text = calls[0]
    finally:
        tokenizer.encode = encode
    # One encode of the prompt, one per response turn (which holds none of the prompt's text).
    assert len(calls) == 1 + len(responses) and prompt_text.endswith("<extra_id_2>")
    assert all(text.startswith("<extra_id_1>Assistant\n") for text in calls[1:])
    for response, prompt_ids in zip(responses, got):
        whole = tokenize_conversation([*prompt, Message(role="assistant", content=response)], tokenizer,
                                      max_tokens=100_000)
        assert prompt_ids == whole
    full = min(len(p.token_ids) for p in got)
    for limit in (full - 1, full - 7, full // 2, 20):
        for response in responses:
            conversation = [*prompt, Message(role="assistant", content=response)]
            try:
                expected = tokenize_conversation(conversation, tokenizer, max_tokens=limit, truncate="left")
            except InputTooLongError as error:
                with pytest.raises(InputTooLongError, match=r"responses\[0\] has %d tokens" % error.num_tokens):
                    tokenize_best_of_n(prompt, [response], tokenizer, max_tokens=limit, truncate="left")
                continue
            assert tokenize_best_of_n(prompt, [response], tokenizer, max_tokens=limit, truncate="left") == [expected]


def test_best_of_n_names_the_over_long_response(tokenizer):
    prompt = msgs(("user", "a question"))
    with pytest.raises(InputTooLongError, match=r"responses\[1\] has \d+ tokens; the limit is 100") as info:
        tokenize_best_of_n(prompt, ["ok", "long " * 200], tokenizer, max_tokens=100)
    assert info.value.param == "responses[1]"
