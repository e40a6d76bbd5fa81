import numpy as np
import pytest

from configs.service import ATTRIBUTE_NAMES, DEFAULT_WEIGHTS
from deployments.errors import InvalidRequestError
from deployments.scoring import ScoringDeployment, WeightedScorer, parse_scoring_user_config, parse_user_config


@pytest.fixture
def scorer():
    return WeightedScorer(ATTRIBUTE_NAMES, DEFAULT_WEIGHTS)


def test_dot_product_with_default_weights(scorer):
    rng = np.random.default_rng(0)
    attributes = rng.normal(size=(4, 9)).astype(np.float32)
    out = scorer.score(attributes)
    expected = attributes.astype(np.float64) @ np.asarray(DEFAULT_WEIGHTS, dtype=np.float64)
    assert [row["score"] for row in out] == pytest.approx(expected.tolist(), abs=0, rel=1e-15)
    assert list(out[0]["attributes"]) == list(ATTRIBUTE_NAMES)
    assert out[2]["attributes"]["helpfulness"] == float(attributes[2, 4])
    assert all(type(row["score"]) is float for row in out)


def test_accepts_lists(scorer):
    out = scorer.score([[1.0] * 9, [0.0] * 9])
    assert out[0]["score"] == pytest.approx(sum(DEFAULT_WEIGHTS))
    assert out[1]["score"] == 0.0


def test_per_request_weights_override_once(scorer):
    attributes = [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    only_helpfulness = [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert scorer.score(attributes, only_helpfulness)[0]["score"] == 5.0
    assert scorer.score(attributes)[0]["score"] == pytest.approx(
        float(np.dot(DEFAULT_WEIGHTS, attributes[0]))
    )


def test_per_request_weights_wrong_length_is_a_400(scorer):
    with pytest.raises(InvalidRequestError) as info:
        scorer.score([[0.0] * 9], [1.0, 2.0])
    assert info.value.param == "weights"
    assert "2" in info.value.message and "9" in info.value.message


def test_weigh_gives_each_row_its_own_weights(scorer):
    rng = np.random.default_rng(1)
    attributes = rng.normal(size=(5, 9)).astype(np.float32)
    shared = [0.0, 0, 0, 0, 1, 0, 0, 0, 0]  # one request's weights object, on two of its rows
    own = [1.0] * 9
    rows = [None, shared, own, shared, None]
    weighed = scorer.weigh(attributes, rows)
    out = weighed.scores
    assert weighed.rewards is None  # no named weights anywhere: no per-row list
    a = attributes.astype(np.float64)
    expected = [a[0] @ np.asarray(DEFAULT_WEIGHTS), a[1, 4], a[2].sum(), a[3, 4], a[4] @ np.asarray(DEFAULT_WEIGHTS)]
    assert out.dtype == np.float64 and out.tolist() == pytest.approx(expected, abs=0, rel=1e-12)


def test_weigh_refuses_bad_weights_and_leaves_overflow_to_the_request(scorer):
    with pytest.raises(ValueError, match="2 values; the model has 9"):
        scorer.weigh(np.zeros((2, 9)), [None, [1.0, 2.0]])
    with pytest.raises(ValueError, match="1 weight rows for 2"):
        scorer.weigh(np.zeros((2, 9)), [None])
    huge = [1e308] * 9
    out = scorer.weigh(np.full((2, 9), 10.0), [None, huge]).scores  # row 1 overflows: not finite, not raised
    assert np.isfinite(out[0]) and not np.isfinite(out[1])
    assert scorer.weigh(np.zeros((0, 9)), []).scores.shape == (0,)


def test_bad_attribute_shape(scorer):
    with pytest.raises(ValueError, match=r"expected \[N, 9\]"):
        scorer.score(np.zeros((2, 5)))


def test_parse_user_config():
    assert parse_user_config({"weights": [1, 2.5, 0]}, 3) == (1.0, 2.5, 0.0)
    with pytest.raises(ValueError, match="3 values; the model has 9"):
        parse_user_config({"weights": [1, 2, 3]}, 9)
    for bad in ({"weights": ["1", 2, 3]}, {"weights": [True, 2, 3]}, {}, {"weights": [1, 2, 3], "x": 1},
                {"weights": [float("nan"), 1, 2]}):
        with pytest.raises(ValueError, match="invalid scoring user_config"):
            parse_user_config(bad, 3)


def test_deployment_class_reconfigure_without_ray():
    cls = ScoringDeployment.func_or_class
    deployment = cls({"checkpoint_path": "/nonexistent"})
    assert deployment.current_weights() == list(DEFAULT_WEIGHTS)
    deployment.reconfigure({"weights": [1.0] + [0.0] * 8})
    assert deployment.score([[2.0] + [5.0] * 8], None)[0]["score"] == 2.0
    with pytest.raises(ValueError, match="has 2 values"):
        deployment.reconfigure({"weights": [1.0, 2.0]})
    assert deployment.current_weights() == [1.0] + [0.0] * 8


# --- named weights: a reward dictionary per row (GDPO-style multi-objective RL) ---------------------------

HELPFUL = [0.0, 0, 0, 0, 1.0, 0.5, 0, 0, 0]
CONCISE = [0.0, 0, 0, 0, 0, 0, 0, 0, -1.0]


def test_named_weights_give_one_reward_per_name_and_keep_the_default_scalar(scorer):
    rng = np.random.default_rng(2)
    attributes = rng.normal(size=(3, 9)).astype(np.float32)
    out = scorer.score(attributes, {"helpful": HELPFUL, "concise": CONCISE})
    a = attributes.astype(np.float64)
    for i, row in enumerate(out):
        assert list(row["rewards"]) == ["helpful", "concise"]  # the request's order
        assert row["rewards"]["helpful"] == pytest.approx(float(a[i] @ np.asarray(HELPFUL)), abs=0, rel=1e-15)
        assert row["rewards"]["concise"] == -float(a[i, 8])
        assert row["score"] == pytest.approx(float(a[i] @ np.asarray(DEFAULT_WEIGHTS)), abs=0, rel=1e-15)
    assert "rewards" not in scorer.score(attributes)[0] and "rewards" not in scorer.score(attributes, HELPFUL)[0]


def test_a_named_vector_equal_to_the_default_weights_gives_the_score_exactly(scorer):
    attributes = np.random.default_rng(3).normal(size=(6, 9)).astype(np.float32)
    for row in scorer.score(attributes, {"same": list(DEFAULT_WEIGHTS)}):
        assert row["rewards"]["same"] == row["score"]


def test_weigh_mixes_rows_with_named_vector_and_default_weights(scorer):
    attributes = np.arange(27, dtype=np.float32).reshape(3, 9)
    named = {"helpful": HELPFUL}
    weighed = scorer.weigh(attributes, [None, named, HELPFUL])
    assert weighed.rewards[0] is None and weighed.rewards[2] is None
    assert weighed.rewards[1] == {"helpful": 9 * 1 + 4 + 0.5 * (9 * 1 + 5)}
    assert weighed.scores[1] == pytest.approx(float(attributes[1] @ np.asarray(DEFAULT_WEIGHTS)))
    assert weighed.scores[2] == float(attributes[2] @ np.asarray(HELPFUL))


def test_service_named_weights_apply_unless_the_request_names_its_own():
    scorer = WeightedScorer(ATTRIBUTE_NAMES, DEFAULT_WEIGHTS, {"concise": CONCISE})
    attributes = np.full((2, 9), 2.0)
    weighed = scorer.weigh(attributes, [None, {"helpful": HELPFUL}])
    assert weighed.rewards == [{"concise": -2.0}, {"helpful": 3.0}]
    assert scorer.score(attributes, [1.0] * 9)[0]["rewards"] == {"concise": -2.0}  # a plain vector: scalar only


@pytest.mark.parametrize("weights, param, fragment", [
    ({"helpful": [1.0, 2.0]}, "weights.helpful", "weights.helpful has 2 values; the model has 9 attributes"),
    ({f"n{i}": HELPFUL for i in range(17)}, "weights", "17 names; the limit is 16"),
    ({"x" * 65: HELPFUL}, "weights", "has 65 characters; the limit is 64"),
    ({"a b": HELPFUL}, "weights", "may only have letters"),
    ({}, "weights", "no names"),
    ({"ok": HELPFUL, "bad": [float("nan")] * 9}, "weights.bad", "finite"),
], ids=["length", "too-many-names", "long-name", "bad-name", "empty", "not-finite"])
def test_bad_named_weights_are_a_400_naming_the_field(scorer, weights, param, fragment):
    with pytest.raises(InvalidRequestError) as info:
        scorer.score([[0.0] * 9], weights)
    assert info.value.param == param and fragment in info.value.message


def test_an_overflowing_named_reward_is_an_error_naming_its_field(scorer):
    named = {"fine": HELPFUL, "huge": [1e308] * 9}
    with pytest.raises(InvalidRequestError, match="the reward 'huge' of prompt 1 overflows to inf") as info:
        scorer.score([[0.0] * 9, [10.0] * 9], named)
    assert info.value.param == "weights.huge"
    assert scorer.weigh(np.full((1, 9), 10.0), [named]).rewards[0]["huge"] == np.inf  # weigh never raises for it
    service = WeightedScorer(ATTRIBUTE_NAMES, DEFAULT_WEIGHTS, {"huge": [1e308] * 9})
    with pytest.raises(ValueError, match="with the service weights"):
        service.score([[10.0] * 9])


def test_user_config_named_weights():
    parsed = parse_scoring_user_config({"weights": [1, 0, 0], "named_weights": {"a": [0, 1, 0]}}, 3)
    assert parsed.named_weights == {"a": (0.0, 1.0, 0.0)}
    assert parse_scoring_user_config({"weights": [1, 0, 0]}, 3).named_weights is None
    for bad, fragment in (({"a": [0, 1]}, "named_weights.a has 2 values; the model has 3"),
                          ({"a": [0, float("inf"), 0]}, "finite"),
                          ({f"n{i}": [0, 0, 0] for i in range(17)}, "17 names; the limit is 16")):
        with pytest.raises(ValueError, match="invalid scoring user_config") as info:
            parse_scoring_user_config({"weights": [1, 0, 0], "named_weights": bad}, 3)
        assert fragment in str(info.value)
    deployment = ScoringDeployment.func_or_class({"checkpoint_path": "/nonexistent"})
    assert deployment.current_named_weights() is None
    deployment.reconfigure({"weights": list(DEFAULT_WEIGHTS), "named_weights": {"concise": CONCISE}})
    assert deployment.current_named_weights() == {"concise": CONCISE}
    assert deployment.score([[1.0] * 9])[0]["rewards"] == {"concise": -1.0}
    deployment.reconfigure({"weights": list(DEFAULT_WEIGHTS)})  # the whole state: the named weights go
    assert deployment.current_named_weights() is None and "rewards" not in deployment.score([[1.0] * 9])[0]
