"""The hosted NVIDIA API's reward interface (NIM, OpenAI chat-completions shape, as build.nvidia.com
answers for nemotron-4-340b-reward):
request and response bodies of `POST /v1/chat/completions` and `GET /v1/models`.

The request is a conversation (user, then assistant; an optional system message first) scored at its last
assistant message. The response carries the last five attributes (the trained ones) twice: as the
`name:value,...` content string and as `logprobs.content` entries; `finish_reason` is `"length"` and
`usage.completion_tokens` is 1, as the hosted API answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, StrictStr, field_validator
from pydantic_core import PydanticCustomError

from deployments.schemas import Message, StrictBody, attribute_string, check_message_roles

NIM_TRAINED_ATTRIBUTES = 5  # the hosted API reports the HelpSteer attributes: the last five of the head
OWNED_BY = "reward-serve"


class ChatCompletionRequest(StrictBody):
    model: StrictStr = Field(min_length=1, description="The served model's name, as `GET /v1/models` lists it.")
    messages: list[Message] = Field(
        min_length=1, description="The conversation; the last message must be the assistant's (it is scored)."
    )

    # Generation parameters that SDKs and tools send by default: accepted and ignored, as the hosted API does
    # (a reward model generates nothing; one choice is answered). Unknown names are still refused.
    n: Any = Field(default=None, description="Accepted and ignored.")
    temperature: Any = Field(default=None, description="Accepted and ignored.")
    top_p: Any = Field(default=None, description="Accepted and ignored.")
    max_tokens: Any = Field(default=None, description="Accepted and ignored.")
    max_completion_tokens: Any = Field(default=None, description="Accepted and ignored.")
    stop: Any = Field(default=None, description="Accepted and ignored.")
    seed: Any = Field(default=None, description="Accepted and ignored.")
    presence_penalty: Any = Field(default=None, description="Accepted and ignored.")
    frequency_penalty: Any = Field(default=None, description="Accepted and ignored.")
    logit_bias: Any = Field(default=None, description="Accepted and ignored.")
    logprobs: Any = Field(default=None, description="Accepted and ignored (the attributes always come as logprobs).")
    top_logprobs: Any = Field(default=None, description="Accepted and ignored.")
    user: Any = Field(default=None, description="Accepted and ignored.")
    stream_options: Any = Field(default=None, description="Accepted and ignored.")
    stream: bool | None = Field(default=None, description="Only false: a score is one answer, not a stream.")

    @field_validator("messages")
    @classmethod
    def _check_roles(cls, messages: list[Message]) -> list[Message]:
        return check_message_roles(messages)

    @field_validator("stream")
    @classmethod
    def _check_stream(cls, stream: bool | None) -> bool | None:
        if stream:
            raise PydanticCustomError(
                "stream_unsupported", "streaming is not supported: a reward score is one answer; send stream: false"
            )
        return stream


def trained_attributes(attributes: Mapping[str, float]) -> dict[str, float]:
    """The attributes the hosted API reports: the last `NIM_TRAINED_ATTRIBUTES` of the head, in order."""
    return dict(list(attributes.items())[-NIM_TRAINED_ATTRIBUTES:])


def chat_completion_body(
    response_id: str, model: str, attributes: Mapping[str, float], prompt_tokens: int
) -> dict[str, Any]:
    """The chat-completions response body for one scored conversation (raw float values)."""
    reported = trained_attributes(attributes)
    return {
        "id": response_id,
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": attribute_string(reported)},
                "logprobs": {
                    "content": [
                        {"token": name, "logprob": value, "top_logprobs": []} for name, value in reported.items()
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    }


def models_body(model: str, device: str) -> dict[str, Any]:
    """`GET /v1/models`: the one served model, with what computes its scores (`device`: cpu, cuda, or
    `simulated:<card>` on a simulated accelerator)."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": OWNED_BY,
                                        "device": device}]}
