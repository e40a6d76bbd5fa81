"""The per-request limits of `configs.service.RouterConfig`, each checked before the work it bounds and
answered with a 400 that names the limit and the value (the body size, `max_request_bytes`, is checked as
the body is read: `deployments.http_body`; a handle call's request, which has no body, is bounded by its
characters of text against the same limit before it is validated: `check_handle_request_size`).

* conversations per request and messages per conversation: on the parsed JSON, before it is validated into
  models (a JSON message is a few bytes; its validated model is hundreds);
* prompts per request (one per conversation, one per assistant turn with `turns: "all"`, one per response
  of a best-of-N item, one per KServe row): before tokenization;
* tokens per request (over all prompts, as scored after fitting): before anything enters the model queue.
"""

from __future__ import annotations

import json
from typing import Any

from configs.service import RouterConfig
from deployments.errors import InvalidRequestError, RequestTooLargeError


def limit_error(what: str, value: int, unit: str, limit_name: str, limit: int, param: str | None) -> InvalidRequestError:
    return InvalidRequestError(f"{what} has {value} {unit}; the limit (router.{limit_name}) is {limit}", param=param)


def prompts_in(conversation: Any, turns: str) -> int:
    """Prompts one conversation item scores: its responses (best-of-N), else its assistant turns with
    `turns: "all"`, else one."""
    responses = getattr(conversation, "responses", None)
    if responses is not None:
        return len(responses)
    if turns == "all":
        return sum(message.role == "assistant" for message in conversation.messages)
    return 1


def check_score_request(request: Any, limits: RouterConfig) -> None:
    """Conversations (or best-of-N responses), messages per conversation and prompts of a validated
    `/v1/score` request."""
    conversations = request.scored_conversations
    field = "responses" if request.best_of_n else "conversations"
    if len(conversations) > limits.max_conversations_per_request:
        raise InvalidRequestError(
            f"{field} has {len(conversations)} items; the limit is {limits.max_conversations_per_request}",
            param=field,
        )
    if request.best_of_n:
        check_messages(len(request.prompt) + 1, limits, "prompt")
    else:
        for index, conversation in enumerate(conversations):
            check_messages(len(conversation.messages), limits, f"conversations[{index}].messages")
    check_prompts(sum(prompts_in(c, request.turns) for c in conversations), limits,
                  param="turns" if request.turns == "all" else field)


def parse_json(body: bytes) -> Any:
    """The JSON of a request body; InvalidRequestError saying where it is broken."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None


def check_raw_score_request(raw: Any, limits: RouterConfig) -> None:
    """The counts of a `/v1/score` body as parsed JSON; wrong types are left to validation."""
    if not isinstance(raw, dict):
        return
    responses, prompt = raw.get("responses"), raw.get("prompt")
    if isinstance(responses, list) and len(responses) > limits.max_conversations_per_request:
        raise InvalidRequestError(
            f"responses has {len(responses)} items; the limit is {limits.max_conversations_per_request}",
            param="responses",
        )
    if isinstance(prompt, list):
        check_messages(len(prompt) + 1, limits, "prompt")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list):
        return
    if len(conversations) > limits.max_conversations_per_request:
        raise InvalidRequestError(
            f"conversations has {len(conversations)} items; the limit is {limits.max_conversations_per_request}",
            param="conversations",
        )
    for index, conversation in enumerate(conversations):
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if isinstance(messages, list):
            check_messages(len(messages), limits, f"conversations[{index}].messages")


def check_messages(num_messages: int, limits: RouterConfig, param: str) -> None:
    if num_messages > limits.max_messages_per_conversation:
        raise limit_error(param, num_messages, "messages", "max_messages_per_conversation",
                          limits.max_messages_per_conversation, param)


def check_prompts(num_prompts: int, limits: RouterConfig, param: str | None) -> None:
    if num_prompts > limits.max_prompts_per_request:
        raise limit_error("the request", num_prompts, "prompts to score", "max_prompts_per_request",
                          limits.max_prompts_per_request, param)


def check_tokens(num_tokens: int, limits: RouterConfig, param: str | None) -> None:
    if num_tokens > limits.max_tokens_per_request:
        raise limit_error("the request", num_tokens, "tokens to score", "max_tokens_per_request",
                          limits.max_tokens_per_request, param)


def check_handle_request_size(request: Any, limits: RouterConfig) -> None:
    """A handle call's request (a dict or a validated model) bounded before any work on it: its strings (keys
    and values) hold at most `max_request_bytes` characters in all. A character is at least one byte of the
    HTTP body the same request would be, so nothing HTTP accepts is refused here. The count is linear in the
    request's items (a string's length is read, not its text) and stops past the limit: no tokenization."""
    limit, total, stack = limits.max_request_bytes, 0, [request]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "model_dump"):  # a validated request, or models inside a dict
            stack.append(item.model_dump())
        if total > limit:
            raise RequestTooLargeError(
                f"the request has more than {limit} characters of text; the limit (router.max_request_bytes) "
                f"is {limit}", param="router.max_request_bytes")
