"""Prefix-affinity keys and the rendezvous order (deployments/router_affinity.py): requests that share a
prompt prefix get one key, whatever route they came by; other prompts get others; a replica leaving moves
only its own keys."""

from __future__ import annotations

import pytest

from deployments.prompt import SteerLMPrompt, render_prompt
from deployments.router_affinity import (
    affinity_key,
    messages_affinity_key,
    rendered_affinity_key,
    rendezvous_order,
)
from deployments.schemas import Message, ScoreRequest

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Name a prime number."}


def _conversation(answer: str) -> list[dict]:
    return [SYSTEM, USER, {"role": "assistant", "content": answer}]


def test_a_group_sent_one_response_per_request_shares_the_best_of_n_key():
    per_response = {affinity_key(ScoreRequest.model_validate({"conversations": [{"messages": _conversation(a)}]}))
                    for a in ("2.", "3.", "a long answer that goes on")}
    best_of_n = affinity_key(ScoreRequest.model_validate({"prompt": [SYSTEM, USER], "responses": ["2.", "3."]}))
    assert per_response == {best_of_n}
    other = affinity_key(ScoreRequest.model_validate(
        {"prompt": [SYSTEM, {"role": "user", "content": "Name an even number."}], "responses": ["2."]}))
    assert other != best_of_n


def test_the_key_is_the_prefix_up_to_the_first_user_turn():
    messages = [Message.model_validate(m) for m in _conversation("2.")]
    later = [*messages, Message(role="user", content="Another?"), Message(role="assistant", content="3.")]
    assert messages_affinity_key(messages) == messages_affinity_key(later)
    without_system = messages_affinity_key(messages[1:])
    assert without_system != messages_affinity_key(messages)


def test_a_rendered_prompt_gets_the_key_of_its_text_before_the_first_assistant_turn():
    header = "<extra_id_1>Assistant\n"
    texts = [render_prompt([Message.model_validate(m) for m in _conversation(a)]) for a in ("2.", "3.")]
    keys = {rendered_affinity_key(text, header) for text in texts}
    assert len(keys) == 1 and None not in keys
    prompt_only = texts[0][: texts[0].index(header)]
    assert rendered_affinity_key(prompt_only + header + "7.\n<extra_id_2>", header) in keys
    other = render_prompt([Message.model_validate(m) for m in (SYSTEM, {"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "2."})])
    assert rendered_affinity_key(other, header) not in keys


@pytest.mark.parametrize("header", [None, ""])
def test_no_header_or_no_assistant_turn_means_no_key(header):
    assert rendered_affinity_key("<extra_id_1>Assistant\nhi", header) is None
    assert rendered_affinity_key("plain text without turns", "<extra_id_1>Assistant\n") is None


def test_the_steerlm_format_names_its_assistant_header(demo_tokenizer_path):
    from deployments.prompt import SentencePieceTokenizer

    prompt = SteerLMPrompt(SentencePieceTokenizer(demo_tokenizer_path))
    rendered = render_prompt([Message.model_validate(m) for m in _conversation("2.")])
    assert rendered.count(prompt.assistant_header) == 1


def test_rendezvous_moves_only_the_keys_of_a_replica_that_left():
    replicas = [f"replica-{i}" for i in range(4)]
    keys = [f"key-{i}" for i in range(400)]
    before = {key: rendezvous_order(key, replicas)[0] for key in keys}
    assert set(before.values()) == set(replicas)  # every replica is some key's home
    after = {key: rendezvous_order(key, replicas[:-1])[0] for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == replicas[-1] for key in moved)
    assert all(rendezvous_order(key, list(reversed(replicas)))[0] == before[key] for key in keys)


def test_a_handed_over_request_keeps_its_tenant_and_what_is_left_of_its_deadline():
    import pickle
    import time

    from deployments.admission import RequestScope, current_scope
    from deployments.affinity_routes import carried_scope, scope_from
    from deployments.errors import DeadlineExceededError

    assert carried_scope() is None and scope_from(None).timeout_s is None  # no scope: no deadline, no tenant
    token = current_scope.set(RequestScope(tenant="key-a", arrived_s=time.perf_counter() - 2.0, timeout_s=10.0))
    try:
        carried = pickle.loads(pickle.dumps(carried_scope()))  # it crosses a Ray handle call
        tenant, left_s = carried
        assert tenant == "key-a" and 7.0 < left_s < 8.01  # 10 s less the 2 s it already waited
        home = scope_from(carried)
        assert home.tenant == "key-a" and home.timeout_s == left_s and 7.0 < home.remaining_s() <= left_s
    finally:
        current_scope.reset(token)
    token = current_scope.set(RequestScope(tenant=None, arrived_s=time.perf_counter() - 5.0, timeout_s=1.0))
    try:
        with pytest.raises(DeadlineExceededError):  # already past: the 504 is raised before the hand-over
            carried_scope()
    finally:
        current_scope.reset(token)
