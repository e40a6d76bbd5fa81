"""The simulated accelerator inside the real system: TP 2 x PP 2 worker actors over the two simulated nodes,
gloo process groups, stage-to-stage sends of the stand-in activations; every sequence gets the pseudo-rewards
of its own tokens whatever the layout and batch mates; the service says `simulated` in every answer.
(Timing against the cost model is asserted in bench/simulated_service.py, not here.)"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from ray import serve

from configs.service import ServiceConfig
from sharding.simulated import pseudo_rewards
from tests.engine_runner import score_batches_with_engine
from tests.integration.conftest import NODE_GPUS, deploy, service_args
from tests.integration.test_model_parallel import assert_stages_on_distinct_nodes

SIMULATED = {"device": "simulated", "simulated_accelerator": "h100-sxm", "dtype": "bfloat16",
             "gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5}


def simulated_args(checkpoint, **parallel) -> dict:
    return service_args(checkpoint, runtime=SIMULATED,
                        parallel={"tensor_parallel_size": 2, "pipeline_parallel_size": 2, **parallel})


def expected(token_batch) -> np.ndarray:
    return np.stack([pseudo_rewards(t, 9) for t in token_batch])


def batches(tokenizer) -> list[list[list[int]]]:
    prompt = "<extra_id_1>User\nWrite a haiku about bread, then explain it.\n<extra_id_1>Assistant\n"
    responses = [tokenizer.encode(f"{prompt}{r}\n<extra_id_2>") for r in ("Yes.", "No, thanks.", "Bread " * 30)]
    others = [tokenizer.encode(f"<extra_id_1>User\n{q}\n<extra_id_1>Assistant\nOk.\n<extra_id_2>")
              for q in ("Hello there.", "What is 2 + 2? " * 40, "ok")]
    # The same sequences with different batch mates, alone, and repeated.
    return [responses + others, others[::-1], responses[1:2], [others[0]] * 3 + responses]


@pytest.mark.parametrize("layout,budget", [("forest", 400), ("padded", 700)])
def test_same_rewards_in_every_layout_and_batch(ray_cluster, demo_checkpoint, tokenizer, layout, budget):
    token_batches = batches(tokenizer)
    assert max(len(t) for b in token_batches for t in b) <= budget
    config = ServiceConfig.model_validate(simulated_args(demo_checkpoint, batch_layout=layout,
                                                         max_tokens_per_micro_batch=budget))
    placements = []
    results = score_batches_with_engine(config, token_batches, inspect=lambda engine: placements.append(
        (engine.describe(), engine.describe()[0]["placement_group_id"], engine.workers)))
    for rewards, token_batch in zip(results, token_batches):
        assert rewards.dtype == np.float32
        np.testing.assert_array_equal(rewards, expected(token_batch))
    workers, pg_id, _ = placements[0]
    assert_stages_on_distinct_nodes(workers, pg_id, pp=2)


@pytest.fixture(scope="module")
def simulated_app(ray_cluster, serve_http, demo_checkpoint):
    from serve_app import build_app

    deploy(build_app(simulated_args(demo_checkpoint)), name="simulated", route_prefix="/simulated")
    yield f"{serve_http}/simulated"
    serve.delete("simulated")


def test_service_says_simulated_in_every_answer(simulated_app, tokenizer):
    conversation = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "Paris."}]
    with httpx.Client(base_url=simulated_app, timeout=60) as client:
        models = client.get("/v1/models")
        assert models.json()["data"][0]["device"] == "simulated:h100-sxm"
        assert models.headers["x-reward-device"] == "simulated:h100-sxm"
        metadata = client.get("/v2/models/demo")
        assert metadata.json()["device"] == "simulated:h100-sxm"
        scored = client.post("/v1/score", json={"conversations": [{"messages": conversation}]})
        assert scored.status_code == 200 and scored.headers["x-reward-device"] == "simulated:h100-sxm"
        body = scored.json()
        assert body["device"] == "simulated:h100-sxm"
        bad = client.post("/v1/score", json={"conversations": []})
        assert bad.status_code == 400 and bad.headers["x-reward-device"] == "simulated:h100-sxm"
    # The router's own tokenization of the conversation, scored by hand.
    from deployments.prompt import tokenize_conversation
    from deployments.schemas import Message

    ids = tokenize_conversation([Message(**m) for m in conversation], tokenizer, max_tokens=4096).token_ids
    want = pseudo_rewards(ids, 9)
    got = body["results"][0]["attributes"]
    np.testing.assert_allclose(list(got.values()), want, rtol=1e-6)
    handle = serve.get_app_handle("simulated")
    assert handle.score.remote({"conversations": [{"messages": conversation}]}).result()["device"] == \
        "simulated:h100-sxm"
