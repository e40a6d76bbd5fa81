"""Request and response models of `POST /v1/score` and `Router.score`, and the mapping of pydantic
validation errors onto the service's one error shape.

Rules that need the service config (conversation count, weights length) are checked by the router,
which knows the numbers; everything else is checked here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    TypeAdapter,
    ValidationError,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from configs.scoring import MAX_REWARD_NAME_CHARS, MAX_REWARD_NAMES, REWARD_NAME_PATTERN, reward_name_problem
from deployments.errors import InvalidRequestError

FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
SUB_LOC_KEY = "sub_loc"  # error ctx key: loc parts below the validated field, e.g. (3, "role")


# Text the service tokenizes. pydantic-core reads a string's characters only when the field has a constraint;
# reading them fails on a lone surrogate ("\ud800": valid JSON, not Unicode text) with a `string_unicode`
# error, so the 400 names the field (as for `Message.content`, whose min_length makes it read), where a bare
# StrictStr would pass the surrogate on to the tokenizer, which fails with a 500.
Text = Annotated[StrictStr, Field(min_length=0)]


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TEXT_PART_SEPARATOR = "\n"  # how the text parts of one message are joined (as vLLM's chat parser joins them)


def join_text_parts(content: Any) -> Any:
    """OpenAI content parts -> one string: `[{"type": "text", "text": ...}, ...]` joined in order with
    `TEXT_PART_SEPARATOR`. Any other part (image, audio, file) cannot be scored: a pydantic error whose
    ctx carries the part's index, so the 400 names e.g. `messages[1].content[0]`. A string passes as is."""
    if not isinstance(content, list):
        return content
    if not content:
        raise PydanticCustomError("no_content_parts", "content has no parts; give a string or text parts")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            described = f"a part of type {kind!r}" if isinstance(kind, str) else "not a content part"
            raise PydanticCustomError(
                "unsupported_content_part",
                "{described} cannot be scored; only text parts (type 'text') can",
                {"described": described, SUB_LOC_KEY: (index,)},
            )
        extra = sorted(set(part) - {"type", "text"})
        if extra or not isinstance(part.get("text"), str):
            problem = f"unexpected key {extra[0]!r}" if extra else "`text` must be a string"
            raise PydanticCustomError("invalid_text_part", "text part: {problem}",
                                      {"problem": problem, SUB_LOC_KEY: (index,)})
        texts.append(part["text"])
    return TEXT_PART_SEPARATOR.join(texts)


_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
                "additionalProperties": False,
            },
        },
    ],
    "description": "The message text, or OpenAI content parts of type `text` (joined in order with a newline); "
    "image, audio and file parts are rejected. Must not be empty.",
}
MessageContent = Annotated[StrictStr, BeforeValidator(join_text_parts), WithJsonSchema(_CONTENT_SCHEMA)]


_VECTOR = TypeAdapter(list[FiniteFloat])


def _weight_vector(value: Any, sub_loc: tuple[Any, ...]) -> list[float]:
    try:
        return _VECTOR.validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PydanticCustomError("invalid_weights", "{detail}",
                                  {"detail": first["msg"], SUB_LOC_KEY: (*sub_loc, *first["loc"])}) from None


def parse_weights(value: Any) -> list[float] | dict[str, list[float]] | None:
    """`weights`: one vector (the scalar's weights), or an object of named vectors (each a named reward; the
    scalar keeps the service's weights). Errors name the place: `weights[3]`, `weights.helpful[0]`. The
    vectors' length is the model's and is checked by the router, which knows it."""
    if value is None:
        return None
    if isinstance(value, dict):
        problem = reward_name_problem(value)
        if problem is not None:
            raise PydanticCustomError("invalid_reward_names", "{problem}", {"problem": problem})
        return {name: _weight_vector(vector, (name,)) for name, vector in value.items()}
    return _weight_vector(value, ())


_NUMBERS = {"type": "array", "items": {"type": "number"}}
_WEIGHTS_SCHEMA = {
    "anyOf": [
        {**_NUMBERS, "description": "Weights of the scalar `score`, one per attribute."},
        {
            "type": "object",
            "minProperties": 1,
            "maxProperties": MAX_REWARD_NAMES,
            "propertyNames": {"maxLength": MAX_REWARD_NAME_CHARS, "pattern": REWARD_NAME_PATTERN},
            "additionalProperties": {**_NUMBERS, "description": "One weight per attribute."},
            "description": "Named weight vectors: each result gets `rewards` = {name: dot(vector, attributes)}; "
            "`score` keeps the service's weights.",
        },
        {"type": "null"},
    ],
    "default": None,
    "description": "Per-request reward weights, one per attribute (they replace the service's weights for "
    "`score`), or an object of named weight vectors, e.g. `{\"helpful\": [...], \"concise\": [...]}` (each result "
    f"then has `rewards` with one value per name; at most {MAX_REWARD_NAMES} names of at most "
    f"{MAX_REWARD_NAME_CHARS} letters, digits, `_`, `.` or `-`). Null uses the service's weights (and its "
    "configured named weights, if any).",
    "examples": [[0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33],
                 {"helpful": [0, 0, 0, 0, 1, 0, 0, 0, 0], "concise": [0, 0, 0, 0, 0, 0, 0, 0, -1]}],
}
RewardWeights = Annotated[Any, BeforeValidator(parse_weights), WithJsonSchema(_WEIGHTS_SCHEMA)]


class Message(StrictBody):
    role: Literal["system", "user", "assistant"] = Field(
        description="`system` only as the first message; the last message must be `assistant`."
    )
    content: MessageContent = Field(min_length=1)


def check_message_roles(messages: list[Message]) -> list[Message]:
    """A system message only first, an assistant message last (the one scored); pydantic errors whose ctx
    carries the failing message's location."""
    for index, message in enumerate(messages):
        if message.role == "system" and index > 0:
            raise PydanticCustomError(
                "system_not_first",
                "a system message is only allowed as the first message",
                {"index": index, SUB_LOC_KEY: (index, "role")},
            )
    last = len(messages) - 1
    if messages[last].role != "assistant":
        raise PydanticCustomError(
            "last_not_assistant",
            "the last message must be from the assistant, not '{role}'",
            {"index": last, "role": messages[last].role, SUB_LOC_KEY: (last, "role")},
        )
    return messages


class Conversation(StrictBody):
    messages: list[Message] = Field(
        min_length=1, description="Turns in order; the last (assistant) message is the one scored."
    )

    @field_validator("messages")
    @classmethod
    def _check_roles(cls, messages: list[Message]) -> list[Message]:
        return check_message_roles(messages)


class ScoreRequest(StrictBody):
    """Either `conversations`, or the best-of-N shape `prompt` + `responses` (each response scored as the
    prompt followed by that assistant message; one result per response, in order)."""

    conversations: list[Conversation] | None = Field(
        default=None, min_length=1,
        description="Conversations to score, each at its last assistant message (or give prompt + responses).",
    )
    prompt: list[Message] | None = Field(
        default=None, min_length=1,
        description="Best-of-N: the messages the responses answer (optional system message first, then turns "
        "ending with a user message); computed once for all responses.",
    )
    responses: list[Text] | None = Field(
        default=None, min_length=1,
        description="Best-of-N: candidate assistant replies to `prompt`; one result per response, in order.",
    )
    weights: RewardWeights = None
    truncate: Literal["none", "left"] = Field(
        default="none",
        description="`none` rejects over-long conversations; `left` drops the oldest turns, then tokens.",
    )
    turns: Literal["last", "all"] = Field(
        default="last",
        description="`last` scores each conversation at its last message; `all` also scores every assistant "
        "turn on its own prefix (the conversation up to that turn), returned as `turns`.",
    )

    @model_validator(mode="after")
    def _check_shape(self) -> ScoreRequest:
        best_of_n = self.prompt is not None or self.responses is not None
        if best_of_n and self.conversations is not None:
            raise PydanticCustomError("request_shape", "give either conversations or prompt + responses, not both")
        if not best_of_n and self.conversations is None:
            raise PydanticCustomError("missing", "Field required (or give prompt + responses)",
                                      {SUB_LOC_KEY: ("conversations",)})
        if best_of_n:
            if self.prompt is None or self.responses is None:
                raise PydanticCustomError("request_shape", "prompt and responses go together")
            if self.prompt[-1].role != "user":
                raise PydanticCustomError(
                    "prompt_not_user", "the prompt must end with a user message, not '{role}'",
                    {"role": self.prompt[-1].role, SUB_LOC_KEY: ("prompt", len(self.prompt) - 1, "role")})
            for index, response in enumerate(self.responses):
                if not response:
                    raise PydanticCustomError("empty_response", "a response must not be empty",
                                              {SUB_LOC_KEY: ("responses", index)})
            for index, message in enumerate(self.prompt):
                if message.role == "system" and index > 0:
                    raise PydanticCustomError("system_not_first", "a system message is only allowed as the first "
                                              "message", {SUB_LOC_KEY: ("prompt", index, "role")})
        return self

    @property
    def best_of_n(self) -> bool:
        return self.responses is not None

    @property
    def scored_conversations(self) -> list[Conversation]:
        """What is scored, in result order: the conversations, or the prompt + each response."""
        if self.conversations is not None:
            return self.conversations
        return [Conversation(messages=[*self.prompt, Message(role="assistant", content=r)]) for r in self.responses]


REWARDS_DESCRIPTION = ("With named weights (the request's `weights` object, else the service's `scoring.named_weights`): "
                       "{name: dot(vector, attributes)} per name; absent otherwise.")


def _absent(value: Any) -> bool:
    """Optional result fields (`rewards`, `turns`) are left out when None: a request without them keeps the
    original response shape (a field-level rule, so the OpenAPI document still shows the fields)."""
    return value is None


class TurnResult(StrictBody):
    message_index: StrictInt = Field(description="Index in `messages` of the assistant turn scored.")
    score: float = Field(description="dot(weights, attributes).")
    attributes: dict[str, float] = Field(description="Raw reward-head outputs by attribute name.")
    rewards: dict[str, float] | None = Field(default=None, exclude_if=_absent, description=REWARDS_DESCRIPTION)
    num_tokens: StrictInt = Field(description="Tokens the model scored for this prefix.")
    truncated: bool = Field(description="Whether turns or tokens were dropped to fit the limit.")


class ScoreResult(StrictBody):
    index: StrictInt = Field(description="Position of the conversation in the request.")
    score: float = Field(description="dot(weights, attributes).")
    attributes: dict[str, float] = Field(description="Raw reward-head outputs by attribute name.")
    rewards: dict[str, float] | None = Field(default=None, exclude_if=_absent, description=REWARDS_DESCRIPTION)
    num_tokens: StrictInt = Field(description="Tokens the model scored for this conversation.")
    truncated: bool = Field(description="Whether turns or tokens were dropped to fit the limit.")
    turns: list[TurnResult] | None = Field(
        default=None, exclude_if=_absent,
        description="With `turns: \"all\"`: one result per assistant turn, in turn order (the last one is the "
        "conversation's own result); absent otherwise.",
    )


class Usage(StrictBody):
    prompt_tokens: StrictInt = Field(description="Tokens scored over all prompts (conversations or turns).")
    computed_tokens: StrictInt = Field(
        description="Tokens the model computed for this request: summed over the batches it rode in, the unique "
        "tokens of its prompts in that batch (a prefix its prompts share within one batch counts once; a request "
        "cut over several batches counts the prefix once per batch). Batched alone in one batch: its unique tokens.")
    queue_ms: float | None = Field(
        default=None, description="Milliseconds from entering the router's batch queue to its first batch.")
    compute_ms: float | None = Field(
        default=None, description="Wall milliseconds of the model batches it rode in (overlapping batches once).")
    batch_tokens: list[StrictInt] | None = Field(
        default=None, description="Computed tokens of each batch it rode in, all requests of the batch, as the "
        "router budgets them (a prefix shared by unrelated requests is counted for each).")
    model_replicas: list[str] | None = Field(
        default=None, description="The model replicas that computed its batches.")


class ScoreResponse(StrictBody):
    model: str = Field(description="Name of the served model.")
    device: str = Field(
        description="What computed the scores: `cpu`, `cuda`, or `simulated:<card>` (a simulated accelerator: no "
        "model ran, the rewards are pseudo-random numbers drawn from each prompt's token ids).")
    results: list[ScoreResult] = Field(
        description="One result per conversation (or per response of a best-of-N request), in request order.")
    usage: Usage = Field(description="Token accounting.")


def attribute_string(values: Mapping[str, float | int]) -> str:
    """`name:value,name:value,...` in the given order: the content string of the hosted chat-completions
    API and the SteerLM label format (the `label` field of NeMo-Aligner's annotated data). Floats are written as Python's shortest
    round-trip form, so parsing the string gives back exactly the number served."""
    return ",".join(f"{name}:{value!r}" for name, value in values.items())


def format_loc(loc: Sequence[Any]) -> str | None:
    """`("conversations", 2, "messages", 0, "role")` -> `conversations[2].messages[0].role`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def invalid_request_from_errors(errors: Sequence[dict[str, Any]], *, body_prefix: bool = False) -> InvalidRequestError:
    """Turns pydantic (or FastAPI, with `body_prefix`) validation errors into one InvalidRequestError
    whose `param` is the first failing field's path."""
    if not errors:
        return InvalidRequestError("request body is invalid")
    first = errors[0]
    loc = list(first.get("loc", ()))
    if body_prefix and loc and loc[0] == "body":
        loc = loc[1:]
    ctx = first.get("ctx") or {}
    if first.get("type") == "json_invalid":
        detail = ctx.get("error") or first.get("msg", "")
        position = f" (at character {loc[0]})" if loc and isinstance(loc[0], int) else ""
        return InvalidRequestError(f"request body is not valid JSON: {detail}{position}")
    loc.extend(ctx.get(SUB_LOC_KEY, ()))
    param = format_loc(loc)
    message = first.get("msg", "invalid value")
    message = f"{param}: {message}" if param else f"request body: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return InvalidRequestError(message, param=param)
