"""vLLM's `/classify` and `/pooling` request and response shapes, for clients written against vLLM (or
SGLang) serving a reward model, such as veRL's reward loop.

Request: `model` (optional; when given it must name the served model), and either `input` (one rendered
prompt or a list of them, tokenized as they are after `<extra_id_2>` is appended when missing) or
`messages` (one conversation, rendered with the model's template and scored at its last assistant
message). Over-long prompts are rejected with a 400 naming `input[i]` or `messages`, as vLLM does.
vLLM's `activation`/`use_activation`/`softmax` may only be false or absent (the head's outputs are
regression values; no activation is applied), and `add_special_tokens` is accepted and has no effect
(prompts are tokenized as the template defines, without added BOS/EOS).

Answer: one `data` item per prompt whose vector (`probs` for `/classify`, `data` for `/pooling`) is the
nine raw attributes in head order followed by the weighted scalar reward, so a client reading the last
element (`data[-1]["probs"][-1]`, as veRL's reward loop does) gets the reward. Each item also carries the
reward as `score` and the attributes by name as `attributes`. `usage` counts the prompt tokens.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, StrictStr, field_validator, model_validator
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from deployments.schemas import SUB_LOC_KEY, Message, StrictBody, Text, check_message_roles

SCORE_LABEL = "score"


def one_or_more(value: Any) -> Any:
    """vLLM's `input` is one prompt or a list of them; one becomes a list of one, so every error about a prompt
    names it `input[i]` (as the token limit does)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("string_or_list", "give a string or a list of strings")
    return value


PromptInput = Annotated[list[Text], BeforeValidator(one_or_more),
                        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})]


class ClassifyRequest(StrictBody):
    model: StrictStr | None = Field(default=None, description="The served model's name; optional.")
    input: PromptInput | None = Field(
        default=None,
        description="A rendered prompt or a list of them (conversation in the model's template); "
        "`<extra_id_2>` is appended when missing. Give `input` or `messages`.",
    )
    messages: list[Message] | None = Field(
        default=None,
        min_length=1,
        description="One conversation, scored at its last (assistant) message. Give `input` or `messages`.",
    )
    activation: StrictBool | None = Field(default=None, description="Only false: outputs are raw values.")
    use_activation: StrictBool | None = Field(default=None, description="Only false: outputs are raw values.")
    softmax: StrictBool | None = Field(default=None, description="Only false: outputs are raw values.")
    add_special_tokens: StrictBool | None = Field(
        default=None, description="Accepted for vLLM clients; prompts are tokenized as the template defines."
    )
    user: StrictStr | None = Field(default=None, description="Accepted and not used.")

    @field_validator("messages")
    @classmethod
    def _check_roles(cls, messages: list[Message] | None) -> list[Message] | None:
        return None if messages is None else check_message_roles(messages)

    @model_validator(mode="after")
    def _check_input(self) -> ClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise PydanticCustomError("input_or_messages", "give either `input` or `messages`",
                                      {SUB_LOC_KEY: ("input",)})
        if self.input is not None and not self.input:
            raise PydanticCustomError("empty_input", "input is an empty list", {SUB_LOC_KEY: ("input",)})
        for name in ("activation", "use_activation", "softmax"):
            if getattr(self, name):
                raise PydanticCustomError(
                    "activation_unsupported",
                    "true is not supported; the reward head's outputs are regression values, returned raw",
                    {SUB_LOC_KEY: (name,)},
                )
        return self

    @property
    def texts(self) -> list[str]:
        return list(self.input or [])


class PoolingRequest(ClassifyRequest):
    encoding_format: Literal["float"] = Field(default="float", description="Only `float`.")


class Usage(StrictBody):
    prompt_tokens: int = Field(description="Tokens scored over all prompts.")
    total_tokens: int = Field(description="Same as prompt_tokens.")
    completion_tokens: int = Field(default=0, description="Always 0.")
    prompt_tokens_details: None = Field(default=None, description="Always null.")


class ClassificationData(StrictBody):
    index: int = Field(description="Position of the prompt in the request.")
    label: str = Field(description="Name of the largest entry of `probs` (vLLM's argmax label).")
    probs: list[float] = Field(description="The nine raw attributes in head order, then the weighted reward.")
    num_classes: int = Field(description="Length of `probs`: attributes + 1.")
    score: float = Field(description="dot(weights, attributes): the last entry of `probs`.")
    attributes: dict[str, float] = Field(description="Raw reward-head outputs by attribute name.")


class ClassifyResponse(StrictBody):
    id: str = Field(description="classify-<request id>.")
    object: Literal["list"] = "list"
    created: int = Field(description="Unix time of the answer.")
    model: str = Field(description="The served model's name.")
    data: list[ClassificationData] = Field(description="One item per prompt, in request order.")
    usage: Usage


class PoolingData(StrictBody):
    index: int = Field(description="Position of the prompt in the request.")
    object: Literal["pooling"] = "pooling"
    data: list[float] = Field(description="The nine raw attributes in head order, then the weighted reward.")
    score: float = Field(description="dot(weights, attributes): the last entry of `data`.")
    attributes: dict[str, float] = Field(description="Raw reward-head outputs by attribute name.")


class PoolingResponse(StrictBody):
    id: str = Field(description="pool-<request id>.")
    object: Literal["list"] = "list"
    created: int = Field(description="Unix time of the answer.")
    model: str = Field(description="The served model's name.")
    data: list[PoolingData] = Field(description="One item per prompt, in request order.")
    usage: Usage


def _vector(item: Mapping[str, Any], names: Sequence[str]) -> list[float]:
    return [item["attributes"][name] for name in names] + [item["score"]]


def classify_body(request_id: str, model: str, scored: Sequence[Mapping[str, Any]], names: Sequence[str],
                  prompt_tokens: int) -> ClassifyResponse:
    """`scored`: the scoring deployment's `{"score", "attributes"}` per prompt."""
    labels = [*names, SCORE_LABEL]
    data = []
    for index, item in enumerate(scored):
        probs = _vector(item, names)
        label = labels[max(range(len(probs)), key=probs.__getitem__)]
        data.append(ClassificationData(index=index, label=label, probs=probs, num_classes=len(probs),
                                       score=item["score"], attributes=item["attributes"]))
    return ClassifyResponse(id=f"classify-{request_id}", created=int(time.time()), model=model, data=data,
                            usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))


def pooling_body(request_id: str, model: str, scored: Sequence[Mapping[str, Any]], names: Sequence[str],
                 prompt_tokens: int) -> PoolingResponse:
    data = [PoolingData(index=i, data=_vector(item, names), score=item["score"], attributes=item["attributes"])
            for i, item in enumerate(scored)]
    return PoolingResponse(id=f"pool-{request_id}", created=int(time.time()), model=model, data=data,
                           usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
