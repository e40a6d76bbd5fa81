"""HF reward models, loaded by the service, against transformers' own forward (float32, CPU): in one process,
at TP2 and PP2 in worker actors, and over HTTP with the checkpoint's chat template."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from ray import serve

from tests.engine_runner import score_with_engine
from tests.hf_models import transformers_rewards, write_hf_model
from tests.integration.conftest import NODE_GPUS, deploy, service_args

TOL = 1e-4
KINDS = ["llama-seqcls", "nemotron-seqcls", "llama-causal"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven is prime, and so is eleven."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me about bread baking, with details on flour and water."},
     {"role": "assistant", "content": "Mix flour, water, salt and yeast; knead; let it rise; bake hot."}],
]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, write_hf_model(kind, root / kind)) for kind in KINDS}


def hf_token_batch(path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [list(tok.apply_chat_template(c, tokenize=True, return_dict=False)) for c in CONVERSATIONS]


@pytest.mark.parametrize("kind", KINDS)
def test_single_process_matches_transformers(hf_models, kind):
    from sharding.local import LocalScorer

    path, model = hf_models[kind]
    batch = hf_token_batch(path)
    scorer = LocalScorer(str(path))
    try:
        got = scorer.score(batch)
    finally:
        scorer.close()
    np.testing.assert_allclose(got, transformers_rewards(model, kind, batch).numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sharded_llama_matches_transformers(ray_cluster, hf_models, tp, pp):
    from configs.service import ServiceConfig

    path, model = hf_models["llama-seqcls"]
    config = ServiceConfig.model_validate(service_args(
        path, parallel={"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "batch_layout": "padded",
                          "max_tokens_per_micro_batch": 4096},
        runtime={"gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5}, router={"max_input_tokens": 4096},
    ))
    batch = hf_token_batch(path)
    got = score_with_engine(config, batch)
    np.testing.assert_allclose(got, transformers_rewards(model, "llama-seqcls", batch).numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["nemotron-seqcls", "llama-causal"])
def test_http_with_chat_template_matches_transformers(serve_http, hf_models, kind):
    from serve_app import build_app

    path, model = hf_models[kind]
    name = f"hf-{kind}"
    scoring = {"weights": [1.0, 0.0, 0.0]} if kind == "nemotron-seqcls" else {}  # >1 output: weights required
    deploy(build_app(service_args(path, scoring=scoring)), name=name, route_prefix=f"/{name}")
    try:
        body = httpx.post(f"{serve_http}/{name}/v1/score", timeout=120,
                          json={"conversations": [{"messages": c} for c in CONVERSATIONS]}).raise_for_status().json()
        # Best-of-N on the last conversation's prompt (its shared text encoded once): each result equals that
        # prompt + response scored as a conversation.
        prompt, responses = CONVERSATIONS[2][:-1], [c[-1]["content"] for c in CONVERSATIONS]
        best = httpx.post(f"{serve_http}/{name}/v1/score", timeout=120,
                          json={"prompt": prompt, "responses": responses}).raise_for_status().json()
        each = httpx.post(f"{serve_http}/{name}/v1/score", timeout=120, json={"conversations": [
            {"messages": [*prompt, {"role": "assistant", "content": r}]} for r in responses]}).raise_for_status().json()
        # Per-turn prompts (prefixes of one encoding) equal the prefixes scored as conversations.
        turns = httpx.post(f"{serve_http}/{name}/v1/score", timeout=120, json={
            "conversations": [{"messages": CONVERSATIONS[2]}], "turns": "all"}).raise_for_status().json()
        prefixes = httpx.post(f"{serve_http}/{name}/v1/score", timeout=120, json={"conversations": [
            {"messages": CONVERSATIONS[2][:2]}, {"messages": CONVERSATIONS[2]}]}).raise_for_status().json()
    finally:
        serve.delete(name)
    want = transformers_rewards(model, kind, hf_token_batch(path)).numpy()
    names = ["helpful", "honest", "harmless"] if kind == "nemotron-seqcls" else ["reward"]
    for result, row, ids in zip(body["results"], want, hf_token_batch(path)):
        assert list(result["attributes"]) == names
        np.testing.assert_allclose([result["attributes"][n] for n in names], row, atol=TOL, rtol=0)
        assert result["num_tokens"] == len(ids)
    assert_same_scores(best["results"], each["results"])
    assert_same_scores(turns["results"][0]["turns"], prefixes["results"])
    if kind == "llama-causal":
        assert body["results"][0]["score"] == pytest.approx(body["results"][0]["attributes"]["reward"], abs=1e-6)


def assert_same_scores(got: list[dict], want: list[dict]) -> None:
    """Results (or turns) scored two ways: the same tokens and attributes, one for one."""
    for one, other in zip(got, want, strict=True):
        assert one["num_tokens"] == other["num_tokens"]
        np.testing.assert_allclose(list(one["attributes"].values()), list(other["attributes"].values()),
                                   atol=1e-5, rtol=0)
