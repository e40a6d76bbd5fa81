"""Named weights (`weights` as an object of named vectors; `scoring.named_weights`): request validation, the
response shape, the service config and its user_config, and the OpenAPI document. The math is
tests/unit/test_scoring.py; the routes are tests/integration/test_named_rewards.py."""

import pytest
from pydantic import ValidationError

from configs.scoring import MAX_REWARD_NAME_CHARS, MAX_REWARD_NAMES, ScoringConfig
from configs.service import ATTRIBUTE_NAMES, DEFAULT_WEIGHTS, ServiceConfig
from deployments.schemas import ScoreRequest, ScoreResult, TurnResult, invalid_request_from_errors
from serve_app import scoring_user_config

CONVERSATION = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
HELPFUL = [0, 0, 0, 0, 1, 0, 0, 0, 0]
CONCISE = [0, 0, 0, 0, 0, 0, 0, 0, -1]


def request_error(weights):
    with pytest.raises(ValidationError) as info:
        ScoreRequest.model_validate({"conversations": [CONVERSATION], "weights": weights})
    return invalid_request_from_errors(info.value.errors())


def test_a_weights_object_is_named_vectors_in_the_request_order():
    request = ScoreRequest.model_validate({"conversations": [CONVERSATION],
                                           "weights": {"helpful": HELPFUL, "concise": CONCISE}})
    assert request.weights == {"helpful": [float(v) for v in HELPFUL], "concise": [float(v) for v in CONCISE]}
    assert list(request.weights) == ["helpful", "concise"]
    # The handle's affinity hop sends the request on as JSON: the object survives it.
    dumped = request.model_dump(mode="json", exclude_unset=True)
    assert ScoreRequest.model_validate(dumped).weights == request.weights


@pytest.mark.parametrize("weights, param, fragment", [
    ({"helpful": [1, "x"]}, "weights.helpful[1]", "valid number"),
    ({"helpful": [1, float("inf")]}, "weights.helpful[1]", "finite"),
    ({"helpful": 3}, "weights.helpful", "valid list"),
    ({"helpful": [True] * 9}, "weights.helpful[0]", "valid number"),
    ({f"n{i}": HELPFUL for i in range(MAX_REWARD_NAMES + 1)}, "weights",
     f"{MAX_REWARD_NAMES + 1} names; the limit is {MAX_REWARD_NAMES}"),
    ({"x" * (MAX_REWARD_NAME_CHARS + 1): HELPFUL}, "weights",
     f"has {MAX_REWARD_NAME_CHARS + 1} characters; the limit is {MAX_REWARD_NAME_CHARS}"),
    ({"a b": HELPFUL}, "weights", "may only have letters, digits"),
    ({}, "weights", "no names"),
    ("1,2", "weights", "valid list"),
    (["a"] * 9, "weights[0]", "valid number"),
], ids=["not-a-number", "not-finite", "not-a-list", "bool", "too-many-names", "long-name", "bad-name", "empty",
        "string", "plain-not-a-number"])
def test_bad_weights_name_the_field_and_the_numbers(weights, param, fragment):
    error = request_error(weights)
    assert error.param == param and fragment in error.message, error.message


def test_the_limits_allow_their_own_numbers():
    weights = {("n%d" % i).ljust(MAX_REWARD_NAME_CHARS, "x"): HELPFUL for i in range(MAX_REWARD_NAMES)}
    assert len(ScoreRequest.model_validate({"conversations": [CONVERSATION], "weights": weights}).weights) == 16


def test_results_carry_rewards_only_when_there_are_named_weights():
    result = ScoreResult(index=0, score=1.0, attributes={"a": 1.0}, num_tokens=3, truncated=False)
    assert "rewards" not in result.model_dump() and "turns" not in result.model_dump()
    named = ScoreResult(index=0, score=1.0, attributes={"a": 1.0}, rewards={"h": 2.0}, num_tokens=3, truncated=False,
                        turns=[TurnResult(message_index=1, score=1.0, attributes={"a": 1.0}, rewards={"h": 2.0},
                                          num_tokens=3, truncated=False)])
    dumped = named.model_dump(mode="json")
    assert dumped["rewards"] == {"h": 2.0} and dumped["turns"][0]["rewards"] == {"h": 2.0}


def test_service_config_named_weights():
    scoring = ScoringConfig(named_weights={"helpful": HELPFUL, "concise": CONCISE})
    assert scoring.named_weights["concise"] == tuple(float(v) for v in CONCISE)
    assert ScoringConfig().named_weights is None
    assert "description" in ScoringConfig.model_json_schema()["properties"]["named_weights"]
    for bad, fragment in (({"h": [1, 2]}, "scoring.named_weights.h has 2 values; the model has 9"),
                          ({"h": [float("nan")] * 9}, "finite"),
                          ({f"n{i}": HELPFUL for i in range(17)}, "17 names; the limit is 16"),
                          ({"a/b": HELPFUL}, "may only have letters")):
        with pytest.raises(ValidationError, match="named_weights") as info:
            ScoringConfig(attribute_names=ATTRIBUTE_NAMES, named_weights=bad)
        assert fragment in str(info.value), str(info.value)


def test_named_weights_are_checked_against_the_checkpoint_names_once_known():
    # Neither names nor weights given: the head's size comes from the checkpoint; the vectors must agree.
    config = ServiceConfig(checkpoint_path="x", scoring={"named_weights": {"a": [1.0], "b": [0.5]}})
    assert config.with_output_names(("reward",)).scoring.named_weights == {"a": (1.0,), "b": (0.5,)}
    with pytest.raises(ValidationError, match="scoring.named_weights.a has 1 values; the model has 9"):
        config.with_output_names(ATTRIBUTE_NAMES)
    with pytest.raises(ValidationError, match="named_weights.b has 2 values; the first vector has 1"):
        ScoringConfig(named_weights={"a": [1.0], "b": [0.5, 0.5]})


def test_build_app_puts_named_weights_in_the_live_user_config():
    scoring = ScoringConfig(named_weights={"helpful": HELPFUL})
    assert scoring_user_config(scoring) == {"weights": list(DEFAULT_WEIGHTS), "named_weights": {"helpful": HELPFUL}}
    assert scoring_user_config(ScoringConfig()) == {"weights": list(DEFAULT_WEIGHTS)}


def test_openapi_shows_the_named_weights_and_the_rewards():
    from deployments.router import app

    schemas = app.openapi()["components"]["schemas"]
    weights = schemas["ScoreRequest"]["properties"]["weights"]
    kinds = {branch["type"] for branch in weights["anyOf"]}
    assert kinds == {"array", "object", "null"}
    (named,) = [branch for branch in weights["anyOf"] if branch["type"] == "object"]
    assert named["maxProperties"] == MAX_REWARD_NAMES
    assert named["propertyNames"]["maxLength"] == MAX_REWARD_NAME_CHARS
    assert named["additionalProperties"]["type"] == "array"
    result = schemas.get("ScoreResult") or schemas["ScoreResult-Output"]
    assert "rewards" in result["properties"] and "rewards" not in result.get("required", [])
