import numpy as np
import pytest

from configs.service import ATTRIBUTE_NAMES, DEFAULT_WEIGHTS
from deployments.errors import InvalidRequestError
from deployments.scoring import ScoringDeployment, WeightedScorer, parse_user_config


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
    out = scorer.weigh(attributes, rows)
    a = attributes.astype(np.float64)
    expected = [a[0] @ np.asarray(DEFAULT_WEIGHTS), a[1, 4], a[2].sum(), a[3, 4], a[4] @ np.asarray(DEFAULT_WEIGHTS)]
    assert out.dtype == np.float64 and out.tolist() == pytest.approx(expected, abs=0, rel=1e-12)


def test_weigh_refuses_bad_weights_and_leaves_overflow_to_the_request(scorer):
    with pytest.raises(ValueError, match="2 values; the model has 9"):
        scorer.weigh(np.zeros((2, 9)), [None, [1.0, 2.0]])
    with pytest.raises(ValueError, match="1 weight rows for 2"):
        scorer.weigh(np.zeros((2, 9)), [None])
    huge = [1e308] * 9
    out = scorer.weigh(np.full((2, 9), 10.0), [None, huge])  # row 1 overflows: not finite, not raised
    assert np.isfinite(out[0]) and not np.isfinite(out[1])
    assert scorer.weigh(np.zeros((0, 9)), []).shape == (0,)


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
