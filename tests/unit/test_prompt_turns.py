from deployments.prompt import fit_token_ids, render_prompt, tokenize_conversation, tokenize_turns
from deployments.schemas import Message


def messages(*pairs, system=None):
    out = [Message(role="system", content=system)] if system else []
    for user, assistant in pairs:
        out += [Message(role="user", content=user), Message(role="assistant", content=assistant)]
    return out


def test_turns_are_the_prefixes(demo_tokenizer):
    convo = messages(("Hi there.", "Hello!"), ("What is tea?", "A drink."), ("And rain?", "Water."), system="Be kind.")
    turns = tokenize_turns(convo, demo_tokenizer, max_tokens=4096)
    assert [index for index, _ in turns] == [2, 4, 6]
    for index, prompt in turns:
        prefix = convo[: index + 1]
        assert prompt.token_ids == tokenize_conversation(prefix, demo_tokenizer, max_tokens=4096).token_ids
        assert prompt.token_ids == demo_tokenizer.encode(render_prompt(prefix))


def test_turns_truncate_each_prefix(demo_tokenizer):
    convo = messages(*[(f"Question {i} " * 30, f"Answer {i} " * 30) for i in range(6)])
    limit = tokenize_conversation(convo[:4], demo_tokenizer, max_tokens=4096).num_tokens
    turns = tokenize_turns(convo, demo_tokenizer, max_tokens=limit, truncate="left")
    assert [p.truncated for _, p in turns] == [False, False, True, True, True, True]
    assert all(p.num_tokens <= limit for _, p in turns)
    assert turns[-1][1].token_ids == tokenize_conversation(convo, demo_tokenizer, max_tokens=limit,
                                                           truncate="left").token_ids


def test_fit_token_ids_matches_truncate_left(demo_tokenizer):
    convo = messages(*[(f"Question {i} " * 30, f"Answer {i} " * 30) for i in range(4)], system="Short.")
    ids = demo_tokenizer.encode(render_prompt(convo))
    for limit in (len(ids), len(ids) - 1, len(ids) // 2, 60):
        fitted = fit_token_ids(ids, demo_tokenizer, max_tokens=limit)
        want = tokenize_conversation(convo, demo_tokenizer, max_tokens=limit, truncate="left")
        assert (fitted.token_ids, fitted.truncated) == (want.token_ids, want.truncated)
    plain = demo_tokenizer.encode("no markers at all " * 20)
    assert fit_token_ids(plain, demo_tokenizer, max_tokens=10).token_ids == plain[-10:]
