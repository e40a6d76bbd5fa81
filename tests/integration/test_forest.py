"""Token-forest batches through the real engine (fp32 CPU): every score of a forest batch equals the score of
that sequence run alone (one padded forward at one rank), at TP1, TP2, PP2 and TP2xPP2 (there with two more
batches streamed in behind it), for random conversations with `turns: "all"` prefixes, best-of-N responses
and repeats; and the best-of-N request shape and `usage.computed_tokens` over HTTP and the handle."""

from __future__ import annotations

import random

import numpy as np
import pytest
from ray import serve

from configs.service import ATTRIBUTE_NAMES, ServiceConfig
from deployments.prompt import tokenize_conversation, tokenize_turns
from deployments.schemas import ScoreRequest
from sharding.forest import build_forest
from tests.engine_runner import score_batches_with_engine, score_with_engine
from tests.integration.conftest import NODE_GPUS, service_args

TOL = 1e-5
WORDS = ["bread", "moon", "prime", "river", "tea", "café", "naïve", "日本語", "Ωmega", "🙂", "über", "ñandú", "x²"]


def random_conversation(rng: random.Random) -> dict:
    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    messages = [{"role": "system", "content": text(rng.randint(2, 10))}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 6)):
        messages.append({"role": "user", "content": text(rng.randint(1, 15))})
        messages.append({"role": "assistant", "content": text(rng.randint(1, 20))})
    return {"messages": messages}


def best_of_n_body(rng: random.Random, n: int) -> dict:
    prompt = random_conversation(rng)["messages"][:-1]
    return {"prompt": prompt, "responses": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                                            for _ in range(n)]}


def token_ids(tokenizer, body: dict, turns: str = "last") -> list[list[int]]:
    request = ScoreRequest.model_validate(body)
    out = []
    for c in request.scored_conversations:
        if turns == "all":
            out.extend(p.token_ids for _, p in tokenize_turns(c.messages, tokenizer, max_tokens=4096))
        else:
            out.append(tokenize_conversation(c.messages, tokenizer, max_tokens=4096).token_ids)
    return out


def tokens_computed_once(batch: list[list[int]]) -> int:
    """Tokens a request computes when it rides in one batch alone and every shared prefix is computed once:
    its distinct prefixes (each is one token computed over the tokens before it), counted here by hand."""
    return len({tuple(ids[:end]) for ids in batch for end in range(1, len(ids) + 1)})


def alone(reference_scorer, batch: list[list[int]]) -> np.ndarray:
    return np.concatenate([reference_scorer.score([ids]) for ids in batch])


@pytest.fixture(scope="module")
def forest_batch(tokenizer) -> list[list[int]]:
    """Per-turn prefixes of random conversations, a best-of-5, repeats and a prefix of another sequence."""
    rng = random.Random(8)
    batch = []
    for _ in range(6):
        batch += token_ids(tokenizer, {"conversations": [random_conversation(rng)]}, turns="all")
    batch += token_ids(tokenizer, best_of_n_body(rng, 5))
    batch += [batch[3], batch[-1], batch[0][:5]]
    return batch


@pytest.fixture(scope="module")
def forest_reference(reference_scorer, forest_batch) -> np.ndarray:
    return alone(reference_scorer, forest_batch)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=["tp1", "tp2", "pp2", "tp2pp2"])
def test_forest_engine_equals_each_sequence_alone(ray_cluster, demo_checkpoint, forest_batch, forest_reference,
                                                  reference_scorer, tp, pp):
    budget = max(len(t) for t in forest_batch) + 64  # several rows, tries cut between rows
    config = ServiceConfig.model_validate(service_args(
        demo_checkpoint,
        parallel={"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "max_tokens_per_micro_batch": budget},
        runtime={"gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5},
    ))
    forest = build_forest(forest_batch, budget)
    assert len(forest.rows) >= 3 and forest.computed_tokens < 0.7 * sum(len(t) for t in forest_batch)
    if (tp, pp) == (2, 2):
        # The engine streams (no per-batch lock): two more batches submitted right behind this one, each scored
        # exactly as its sequences alone; activations cross stages as 1/TP slices (the default).
        assert config.parallel.scatter_gather_activations
        more = [forest_batch[::-1][:4], forest_batch[2:] + forest_batch[:1]]
        rewards, *streamed = score_batches_with_engine(config, [forest_batch, *more])
        for batch, got in zip(more, streamed):
            assert np.abs(got - alone(reference_scorer, batch)).max() <= TOL
    else:
        rewards = score_with_engine(config, forest_batch)
    assert rewards.dtype == np.float32 and rewards.shape == (len(forest_batch), 9)
    diff = np.abs(rewards - forest_reference).max()
    print(f"forest engine tp{tp} pp{pp}: {len(forest_batch)} sequences, {forest.computed_tokens} of "
          f"{sum(map(len, forest_batch))} tokens computed in {len(forest.rows)} rows, max abs diff {diff}")
    assert diff <= TOL, f"max abs diff {diff}"


def test_http_best_of_n_and_all_turns_equal_each_sequence_alone(http, reference_scorer, tokenizer):
    rng = random.Random(3)
    body = best_of_n_body(rng, 4)
    body["responses"][2] = body["responses"][0]  # a repeated response reads the same node
    got = http.post("/v1/score", json=body).raise_for_status().json()
    ids = token_ids(tokenizer, body)
    want = alone(reference_scorer, ids)
    assert [r["index"] for r in got["results"]] == [0, 1, 2, 3]
    attributes = np.array([[r["attributes"][name] for name in ATTRIBUTE_NAMES] for r in got["results"]])
    assert np.abs(attributes - want).max() <= TOL
    usage = got["usage"]
    assert (usage["prompt_tokens"], usage["computed_tokens"]) == (sum(map(len, ids)), tokens_computed_once(ids))
    assert usage["computed_tokens"] < usage["prompt_tokens"]
    # Alone on the idle service: one batch, all of it this request's.
    assert usage["batch_tokens"] == [usage["computed_tokens"]] and len(usage["model_replicas"]) == 1
    assert usage["queue_ms"] >= 0 and usage["compute_ms"] > 0

    conversations = [random_conversation(rng) for _ in range(3)]
    got = http.post("/v1/score", json={"conversations": conversations, "turns": "all"}).raise_for_status().json()
    ids = token_ids(tokenizer, {"conversations": conversations}, turns="all")
    want = alone(reference_scorer, ids)
    turns = [t for r in got["results"] for t in r["turns"]]
    attributes = np.array([[t["attributes"][name] for name in ATTRIBUTE_NAMES] for t in turns])
    assert np.abs(attributes - want).max() <= TOL
    assert ((got["usage"]["prompt_tokens"], got["usage"]["computed_tokens"])
            == (sum(map(len, ids)), tokens_computed_once(ids)))


def test_handle_best_of_n_and_bad_shape(demo_app, reference_scorer, tokenizer):
    from deployments.errors import InvalidRequestError

    body = best_of_n_body(random.Random(5), 3)
    handle = serve.get_deployment_handle("Router", app_name="reward")
    got = handle.score.remote(body).result()
    want = alone(reference_scorer, token_ids(tokenizer, body))
    attributes = np.array([[r["attributes"][name] for name in ATTRIBUTE_NAMES] for r in got["results"]])
    assert np.abs(attributes - want).max() <= TOL
    with pytest.raises(InvalidRequestError, match=r"prompt\[0\].role: the prompt must end with a user message"):
        handle.score.remote({"prompt": [{"role": "assistant", "content": "x"}], "responses": ["y"]}).result()
