"""Scale-out on the simulated two-node cluster: two model replicas (TP 1 each, the demo model) behind two
routers; a worker killed under load costs the clients nothing; a router replica killed while the other
serves; the model deployment autoscaled 1 -> 2 -> 1. (A client that leaves cancels no batch mate:
tests/unit/test_batcher.py, where the batch's context is observable without timing.)"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from ray import serve
from ray._private.state import actors as gcs_actor_table  # GCS records; the state API needs a dashboard

from tests.integration.conftest import deploy, service_args
from tests.integration.test_model_parallel import PROMPTS, score_body
from tests.integration.test_service import reference_attributes

TOL = 1e-5


def _replica_actors(app: str, deployment: str) -> list[dict]:
    name = f"ServeReplica:{app}:{deployment}"
    return [a for a in gcs_actor_table().values() if a["ActorClassName"] == name and a["State"] == "ALIVE"]


def _running(app: str, deployment: str) -> int:
    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


def _stream(url: str, stop: threading.Event, log: list[tuple[float, int, dict | None]]) -> None:
    """One client sending requests back to back until `stop`; logs (finish time, status, body if 200)."""
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            response = client.post(f"{url}/v1/score", json=score_body(PROMPTS[:3]))
            log.append((time.monotonic(), response.status_code, response.json() if response.status_code == 200
                        else response.text))


@pytest.fixture(scope="module")
def scaled_app(serve_http, demo_checkpoint):
    from serve_app import build_app

    args = service_args(demo_checkpoint, model={"num_replicas": 2}, router={"num_replicas": 2})
    deploy(build_app(args), name="scaled", route_prefix="/scaled")
    yield f"{serve_http}/scaled"
    serve.delete("scaled")


def test_worker_killed_in_one_of_two_replicas_costs_clients_nothing(scaled_app, reference_scorer, tokenizer):
    assert _running("scaled", "RewardModelDeployment") == 2
    model = serve.get_deployment_handle("RewardModelDeployment", app_name="scaled")
    victim = model.describe.remote().result()[0]
    stop, logs = threading.Event(), [[] for _ in range(4)]
    streams = [threading.Thread(target=_stream, args=(scaled_app, stop, log), daemon=True) for log in logs]
    for thread in streams:
        thread.start()
    deadline = time.monotonic() + 60
    while not all(len(log) >= 2 for log in logs):  # every stream has had batches through
        assert time.monotonic() < deadline, "no traffic"
        time.sleep(0.1)
    killed_at = time.monotonic()
    os.kill(gcs_actor_table(victim["actor_id"])["Pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30  # keep the load on until every stream had requests answered after the kill
    while not all(sum(t > killed_at + 2 for t, _, _ in log) >= 3 for log in logs):
        assert time.monotonic() < deadline, "streams stalled after the kill"
        time.sleep(0.2)
    stop.set()
    for thread in streams:
        thread.join(timeout=120)
    want = reference_attributes(reference_scorer, tokenizer, score_body(PROMPTS[:3])["conversations"])
    for log in logs:
        assert [status for _, status, _ in log] == [200] * len(log), [body for _, s, body in log if s != 200][:2]
        for _, _, body in log:  # a retried batch is scored again in full: the same numbers
            got = np.array([list(r["attributes"].values()) for r in body["results"]])
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_requests_sharing_a_prompt_meet_on_one_router(scaled_app):
    """A GRPO group sent one request per response: Serve's proxy spreads them over both routers, which hand
    each to the group's home router (rendezvous hash of the prompt prefix); the other router scores none."""
    from deployments.router_affinity import affinity_key
    from deployments.schemas import ScoreRequest

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}]
    bodies = [{"conversations": [{"messages": [*prompt, {"role": "assistant", "content": f"{n}."}]}]}
              for n in (2, 3, 5, 7, 11, 13, 17, 19)]
    key = affinity_key(ScoreRequest.model_validate(bodies[0]))

    async def group() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=scaled_app, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/score", json=body) for body in bodies))

    assert all(r.status_code == 200 for r in asyncio.run(group()))
    routers = serve.get_deployment_handle("Router", app_name="scaled")
    home = routers.routed_requests.remote(affinity_key=key).result()
    assert home["requests"][key] == len(bodies)
    for probe in range(64):  # a key whose home is the other router
        other = routers.routed_requests.remote(affinity_key=f"probe-{probe}").result()
        if other["replica_id"] != home["replica_id"]:
            break
    assert other["replica_id"] != home["replica_id"]
    assert key not in other["requests"]


def _route_bodies(model_name: str) -> dict[str, tuple[str, list[dict], str | None]]:
    """Per route: (path, one body per response of a GRPO group sharing a prompt, the prompt as rendered text
    (None: a chat-messages key))."""
    from deployments.prompt import render_prompt
    from deployments.schemas import Message

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name an odd number."}]
    answers = [f"{n}." for n in (1, 3, 5, 7, 9, 11, 13, 15)]
    conversations = [[*prompt, {"role": "assistant", "content": a}] for a in answers]
    rendered = [render_prompt([Message.model_validate(m) for m in c]) for c in conversations]
    kserve = [{"inputs": [{"name": "sentences", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}
              for text in rendered]
    return {
        "get_reward": ("/get_reward", [{"query": [text]} for text in rendered], rendered[0]),
        "classify": ("/classify", [{"input": [text]} for text in rendered], rendered[0]),
        "pooling": ("/pooling", [{"input": text} for text in rendered], rendered[0]),
        "kserve": ("/v2/models/reward_model/infer", kserve, rendered[0]),
        "chat": ("/v1/chat/completions", [{"model": model_name, "messages": c} for c in conversations], None),
    }


@pytest.mark.parametrize("route", ["get_reward", "classify", "pooling", "kserve", "chat"])
def test_every_scoring_route_sends_a_group_to_one_router(scaled_app, route):
    """The same for the client protocols: rendered prompts are keyed by their text before the first assistant
    turn, chat messages by their first user turn; each group is scored at one router, the other sees none."""
    from deployments.router_affinity import messages_affinity_key, rendered_affinity_key
    from deployments.schemas import Message

    model_name = httpx.get(f"{scaled_app}/v1/models").json()["data"][0]["id"]
    path, bodies, rendered = _route_bodies(model_name)[route]
    if rendered is not None:
        key = rendered_affinity_key(rendered, "<extra_id_1>Assistant\n")
    else:
        key = messages_affinity_key([Message.model_validate(m) for m in bodies[0]["messages"]])
    routers = serve.get_deployment_handle("Router", app_name="scaled")
    before = {r["replica_id"]: r["requests"].get(key, 0)
              for r in (routers.routed_requests.remote(affinity_key=f"probe-{p}").result() for p in range(64))}
    assert len(before) == 2

    async def group() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=scaled_app, timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=body) for body in bodies))

    responses = asyncio.run(group())
    assert [r.status_code for r in responses] == [200] * len(bodies), responses[0].text
    after = {r["replica_id"]: r["requests"].get(key, 0)
             for r in (routers.routed_requests.remote(affinity_key=f"probe-{p}").result() for p in range(64))}
    served = {replica: after[replica] - before[replica] for replica in after}
    assert sorted(served.values()) == [0, len(bodies)], served


def test_a_router_replica_killed_while_the_other_serves(scaled_app):
    routers = _replica_actors("scaled", "Router")
    assert len(routers) == 2
    os.kill(routers[0]["Pid"], signal.SIGKILL)
    statuses = []
    with httpx.Client(timeout=60) as client:
        for _ in range(20):  # Serve's proxy notices the dead replica and sends to the other
            statuses.append(client.post(f"{scaled_app}/v1/score", json=score_body(PROMPTS[:1])).status_code)
    assert statuses[-10:] == [200] * 10, statuses
    deadline = time.monotonic() + 120  # and Serve starts a replacement
    while _running("scaled", "Router") < 2:
        assert time.monotonic() < deadline, serve.status().applications["scaled"].deployments["Router"]
        time.sleep(1)


def test_model_replicas_autoscale_up_under_load_and_down_when_idle(serve_http, demo_checkpoint):
    from serve_app import build_app

    scaling = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1, "downscale_delay_s": 3,
               "look_back_period_s": 2}
    args = service_args(demo_checkpoint, model={"autoscaling": scaling}, router={"max_batches_in_flight": 1})
    deploy(build_app(args), name="autoscaled", route_prefix="/autoscaled")
    url = f"{serve_http}/autoscaled"
    try:
        assert _running("autoscaled", "RewardModelDeployment") == 1
        stop, logs = threading.Event(), [[] for _ in range(6)]
        streams = [threading.Thread(target=_stream, args=(url, stop, log), daemon=True) for log in logs]
        for thread in streams:
            thread.start()
        deadline = time.monotonic() + 180
        while _running("autoscaled", "RewardModelDeployment") < 2:
            assert time.monotonic() < deadline, serve.status().applications["autoscaled"]
            time.sleep(1)
        stop.set()
        for thread in streams:
            thread.join(timeout=120)
        assert all(status == 200 for log in logs for _, status, _ in log)
        deadline = time.monotonic() + 120
        while _running("autoscaled", "RewardModelDeployment") > 1:
            assert time.monotonic() < deadline, serve.status().applications["autoscaled"]
            time.sleep(1)
    finally:
        serve.delete("autoscaled")
