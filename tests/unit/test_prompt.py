import pytest
import sentencepiece as spm

from deployments.errors import InputTooLongError
from deployments.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    SentencePieceTokenizer,
    render_prompt,
    render_segments,
    tokenize_conversation,
)
from deployments.schemas import Message


def msgs(*pairs):
    return [Message(role=role, content=content) for role, content in pairs]


DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def test_default_system_text_is_exact():
    assert DEFAULT_SYSTEM_PROMPT == DEFAULT_SYSTEM


def test_single_turn_template():
    prompt = render_prompt(msgs(("user", "What is 2+2?"), ("assistant", "4")))
    assert prompt == (
        f"<extra_id_0>System\n{DEFAULT_SYSTEM}\n"
        "<extra_id_1>User\nWhat is 2+2?\n"
        "<extra_id_1>Assistant\n4\n"
        "<extra_id_2>"
    )


def test_system_message_replaces_default():
    prompt = render_prompt(msgs(("system", "Be terse."), ("user", "Hi"), ("assistant", "Hey")))
    assert prompt == "<extra_id_0>System\nBe terse.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHey\n<extra_id_2>"


def test_multi_turn_template():
    prompt = render_prompt(
        msgs(("user", "a"), ("assistant", "b"), ("user", "c\nd"), ("assistant", "e"))
    )
    assert prompt == (
        f"<extra_id_0>System\n{DEFAULT_SYSTEM}\n"
        "<extra_id_1>User\na\n<extra_id_1>Assistant\nb\n"
        "<extra_id_1>User\nc\nd\n<extra_id_1>Assistant\ne\n<extra_id_2>"
    )
    segments = render_segments(msgs(("user", "a"), ("assistant", "b")))
    assert segments.turns == ("<extra_id_1>User\na\n", "<extra_id_1>Assistant\nb\n")


CONVERSATIONS = [
    msgs(("user", "What is 2+2?"), ("assistant", "4")),
    msgs(("system", "You are a pirate."), ("user", "Hello there"), ("assistant", "Arr, ahoy matey!")),
    msgs(("user", "  leading spaces"), ("assistant", "trailing spaces   "), ("user", "tabs\tand\nnewlines\n\n"),
         ("assistant", "digits 12345 and unicode: café, 東京, 🙂")),
    msgs(("assistant", "Only an answer.")),
    msgs(("user", "x"), ("user", "y"), ("assistant", "z"), ("assistant", "<extra_id_1>odd")),
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_segment_wise_tokenization_equals_whole_string(demo_tokenizer, messages):
    whole = demo_tokenizer.encode(render_prompt(messages))
    result = tokenize_conversation(messages, demo_tokenizer, max_tokens=100_000)
    assert result.token_ids == whole
    assert result.truncated is False
    assert result.num_tokens == len(whole)


def test_markers_are_single_tokens_and_no_bos_eos(demo_tokenizer):
    ids = tokenize_conversation(CONVERSATIONS[0], demo_tokenizer, max_tokens=10_000).token_ids
    assert ids[0] == demo_tokenizer.encode("<extra_id_0>")[0]
    assert ids[-1] == demo_tokenizer.encode("<extra_id_2>")[0]
    assert 2 not in ids and 3 not in ids  # bos / eos


def _long_conversation():
    return msgs(
        ("system", "Short system."),
        ("user", "first question " * 20),
        ("assistant", "first answer " * 20),
        ("user", "second question " * 20),
        ("assistant", "the final scored answer ends here"),
    )


def test_over_limit_without_truncation_raises(demo_tokenizer):
    messages = _long_conversation()
    total = len(demo_tokenizer.encode(render_prompt(messages)))
    with pytest.raises(InputTooLongError) as info:
        tokenize_conversation(messages, demo_tokenizer, max_tokens=total - 1, conversation_index=3)
    error = info.value
    assert (error.conversation_index, error.num_tokens, error.limit_tokens) == (3, total, total - 1)
    assert error.message == f"conversations[3] has {total} tokens; the limit is {total - 1}"
    assert tokenize_conversation(messages, demo_tokenizer, max_tokens=total).truncated is False


def test_left_mode_leaves_short_conversations_alone(demo_tokenizer):
    result = tokenize_conversation(CONVERSATIONS[1], demo_tokenizer, max_tokens=4096, truncate="left")
    assert result.truncated is False
    assert result.token_ids == demo_tokenizer.encode(render_prompt(CONVERSATIONS[1]))


def test_tokenizer_rejects_models_without_marker_pieces(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50 + "some more text here\n" * 50)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "plain"), vocab_size=16, hard_vocab_limit=False, minloglevel=2
    )
    with pytest.raises(ValueError, match="one piece"):
        SentencePieceTokenizer(tmp_path / "plain.model")
