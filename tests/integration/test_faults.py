"""What a fault costs (issue 22), with faults injected by worker subclasses the tests pass to the engine
(tests/fault_workers.py), never by a production flag:

* readiness answers while the service is saturated: `/health` is probed 20 times while every batch slot is
  busy with slow forwards, and all 20 are 200 (pings run in the workers' control concurrency group; the model
  replica keeps slots for readiness checks beside the batches);
* a rank stuck in steady state is detected within `runtime.collective_timeout_s` plus a margin, not the
  loading timeout (`runtime.distributed_timeout_s`);
* a worker killed with SIGKILL is restarted alone (`sharding.restart`): only its actor id changes, the
  survivors keep theirs, and the scores afterwards equal the reference."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from configs.service import ServiceConfig
from sharding.protocol import EngineUnavailableError
from tests.fault_workers import HangingRankWorker, SlowForwardWorker
from tests.integration.conftest import NODE_GPUS, deploy, service_args

COLLECTIVE_TIMEOUT_S = 4.0
DETECTION_MARGIN_S = 15.0  # the peers' gloo timeout fires at the collective timeout; the rest is Ray and load


def slow_engine(config: ServiceConfig):
    from ray.util import get_current_placement_group

    from sharding.engine import MegatronEngine

    return MegatronEngine(config, get_current_placement_group(), worker_class=SlowForwardWorker)


def test_health_is_200_twenty_times_while_saturated(ray_cluster, serve_http, demo_checkpoint, tokenizer):
    from serve_app import build_app
    from sharding.checkpoints.formats import open_checkpoint, output_names
    from deployments.reward_model import RewardModelDeployment
    from deployments.router import Router
    from deployments.scoring import ScoringDeployment
    from sharding.placement import placement_for

    config = ServiceConfig.model_validate(service_args(demo_checkpoint, runtime={"cpus_per_worker": 0.5}))
    config = config.with_output_names(output_names(open_checkpoint(config.checkpoint_path)))
    config_json = config.model_dump(mode="json")
    plan = placement_for(config)
    model = RewardModelDeployment.options(
        placement_group_bundles=plan.bundles, placement_group_strategy=plan.strategy,
        ray_actor_options={"num_cpus": config.runtime.replica_cpus},
        max_ongoing_requests=config.model_max_ongoing_calls,  # as serve_app.build_app
    ).bind(config_json, engine_factory=slow_engine)
    assert build_app  # the options above are build_app's for this deployment
    app = Router.bind(model, ScoringDeployment.bind(config_json), config_json)
    prefix = f"{serve_http}/saturated"
    deploy(app, name="saturated", route_prefix="/saturated")
    stop = threading.Event()
    answered: list[tuple[float, float, int]] = []  # (sent, answered, status) of the scoring requests

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                sent = time.monotonic()
                status = http.post(prefix + "/v1/score", json={"conversations": [{"messages": [
                    {"role": "user", "content": "Why is the sky blue?"},
                    {"role": "assistant", "content": "Rayleigh scattering."}]}]}).status_code
                answered.append((sent, time.monotonic(), status))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3 * config.max_batches_in_flight)]
    try:
        for t in threads:
            t.start()
        time.sleep(2 * SlowForwardWorker.FORWARD_S)  # every batch slot busy, requests queued behind them
        probes = []
        with httpx.Client(timeout=30) as http:
            probes_started = time.monotonic()
            for _ in range(20):
                sent = time.monotonic()
                probes.append((http.get(prefix + "/health").status_code, time.monotonic() - sent))
                time.sleep(0.25)
            probes_ended = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        serve.delete("saturated")
    assert [status for status, _ in probes] == [200] * 20, probes
    # Saturated throughout: requests were waiting on the model during the whole probing window.
    waiting = [a for a in answered if a[0] < probes_started and a[1] > probes_ended]
    assert waiting and all(status == 200 for _, _, status in answered), (len(waiting), answered[:5])


def test_hung_rank_is_detected_within_the_collective_timeout(ray_cluster, demo_checkpoint, token_batch_short):
    """TP 2: rank 1 sleeps in its first forward; rank 0 waits for it in the first all-reduce, whose
    steady-state timeout (collective_timeout_s, set after loading) fires, so the batch fails at about that
    time, not at the 600 s set-up timeout nor when the rank wakes after HANG_S."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from sharding.engine import MegatronEngine
    from sharding.placement import placement_for

    config = ServiceConfig.model_validate(service_args(
        demo_checkpoint, parallel={"tensor_parallel_size": 2, "pipeline_parallel_size": 1},
        runtime={"gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5, "distributed_timeout_s": 600,
                 "collective_timeout_s": COLLECTIVE_TIMEOUT_S}))
    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=60)
    engine = None
    try:
        engine = MegatronEngine(config, pg, worker_class=HangingRankWorker)

        async def timed_score() -> float:
            started = time.monotonic()
            with pytest.raises(EngineUnavailableError) as failure:
                await engine.score(token_batch_short)
            assert "a model worker failed" in failure.value.message, failure.value.message
            assert "timed out" in failure.value.message.lower(), failure.value.message
            return time.monotonic() - started

        detected_s = asyncio.run(timed_score())
        assert COLLECTIVE_TIMEOUT_S * 0.9 < detected_s < COLLECTIVE_TIMEOUT_S + DETECTION_MARGIN_S, detected_s
        assert detected_s < HangingRankWorker.HANG_S
    finally:
        if engine is not None:
            engine.shutdown()
        remove_placement_group(pg)


def test_hung_rank_fails_the_health_check(ray_cluster, demo_checkpoint, token_batch_short):
    """PP 2: the last stage sleeps in its forward with no peer waiting in a collective on it; the health
    check (pings answered from the control group with the forward's running time) calls it hung after
    collective_timeout_s + HANG_MARGIN_S."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from sharding.engine import HANG_MARGIN_S, MegatronEngine
    from sharding.placement import placement_for

    config = ServiceConfig.model_validate(service_args(
        demo_checkpoint, parallel={"tensor_parallel_size": 1, "pipeline_parallel_size": 2},
        runtime={"gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5, "collective_timeout_s": COLLECTIVE_TIMEOUT_S}))
    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=60)
    engine = None
    try:
        engine = MegatronEngine(config, pg, worker_class=HangingRankWorker)

        async def watch() -> float:
            batch = asyncio.ensure_future(engine.score(token_batch_short))
            started = time.monotonic()
            while True:
                try:
                    await engine.check_health()
                except EngineUnavailableError as e:
                    assert "rank 1 is hung" in e.message, e.message
                    break
                assert time.monotonic() - started < HangingRankWorker.HANG_S
                await asyncio.sleep(0.5)
            detected_s = time.monotonic() - started
            with pytest.raises(EngineUnavailableError):
                await batch
            return detected_s

        detected_s = asyncio.run(watch())
        limit_s = COLLECTIVE_TIMEOUT_S + HANG_MARGIN_S
        assert limit_s <= detected_s < limit_s + DETECTION_MARGIN_S, detected_s
    finally:
        if engine is not None:
            engine.shutdown()
        remove_placement_group(pg)


@pytest.fixture(scope="module")
def token_batch_short(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(f"<extra_id_1>User\n{p}\n<extra_id_1>Assistant\nSure.\n<extra_id_2>")
            for p in ("Hello there.", "What is 2 + 2?")]


def test_poison_prompt_fails_alone_and_workers_survive(ray_cluster, demo_checkpoint, reference_scorer, tokenizer):
    """TP 2 x PP 2: rank 3 (last stage) raises mid-batch on one prompt. The other prompts of the batch get their
    reference scores, the poison prompt alone fails with the rank's message, no worker is restarted (same
    actor ids), the poison prompt sent again fails again without a reload, and a clean batch afterwards
    scores exactly as before."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from sharding.engine import MegatronEngine
    from sharding.placement import placement_for
    from sharding.protocol import PartialScores
    from tests.fault_workers import PoisonPromptWorker

    prompts = ["Hello there.", "What is 2 + 2?", "List three prime numbers. " * 5, "ok",
               "Write a haiku about bread. " * 6, "Explain why the sky is blue in two sentences."]
    clean = [tokenizer.encode(f"<extra_id_1>User\n{p}\n<extra_id_1>Assistant\nSure.\n<extra_id_2>") for p in prompts]
    assert all(len(t) != PoisonPromptWorker.POISON_LENGTH for t in clean)
    poison = clean[2][:PoisonPromptWorker.POISON_LENGTH]
    batch = clean[:3] + [poison] + clean[3:]
    reference = reference_scorer.score(clean)
    config = ServiceConfig.model_validate(service_args(
        demo_checkpoint, parallel={"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "batch_layout": "padded",
                                   "max_tokens_per_micro_batch": 2 * max(len(t) for t in batch)},
        runtime={"gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5}))
    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=60)
    engine = None
    try:
        engine = MegatronEngine(config, pg, worker_class=PoisonPromptWorker)
        actors = [w["actor_id"] for w in engine.describe()]

        async def scenario():
            first = await engine.score(batch)
            again = await engine.score([poison, clean[0]])
            after = await engine.score(clean)
            return first, again, after

        first, again, after = asyncio.run(scenario())
        assert isinstance(first, PartialScores), type(first)
        assert list(first.failures) == [3], first.failures
        assert "rank 3" in first.failures[3] and "injected fault" in first.failures[3], first.failures
        assert np.isnan(first.attributes[3]).all()
        np.testing.assert_allclose(np.delete(first.attributes, 3, axis=0), reference, atol=1e-5, rtol=0)
        assert isinstance(again, PartialScores) and list(again.failures) == [0], again
        np.testing.assert_allclose(again.attributes[1], reference[0], atol=1e-5, rtol=0)
        assert isinstance(after, np.ndarray)
        np.testing.assert_allclose(after, reference, atol=1e-5, rtol=0)
        assert [w["actor_id"] for w in engine.describe()] == actors  # no worker restarted, nothing reloaded
        assert engine.rejoins >= 2 and engine.broken is None
        asyncio.run(engine.check_health())
    finally:
        if engine is not None:
            engine.shutdown()
        remove_placement_group(pg)


def test_a_client_that_leaves_never_fails_a_batch_mate(ray_cluster, serve_http, demo_checkpoint):
    """Issue 20's cancellation scenario through Serve's HTTP proxy: request A (two prompts, too large for one
    batch) dispatches batch 1 (A's first prompt); batch 2 (A's second prompt and C's prompt) leaves when batch 1
    returns. A's client disconnects while batch 2 is in the model: Serve cancels A and the handle calls made in
    A's context. C must get its score, the one it gets alone, and the service keeps answering."""
    from deployments.reward_model import RewardModelDeployment
    from deployments.router import Router
    from deployments.scoring import ScoringDeployment
    from sharding.checkpoints.formats import open_checkpoint, output_names
    from sharding.placement import placement_for

    # One batch in flight, 256-token batches: A's prompts (~170 tokens each) go in two batches, and A's second
    # fits beside C's (~40 tokens).
    config = ServiceConfig.model_validate(service_args(
        demo_checkpoint, runtime={"cpus_per_worker": 0.5},
        router={"max_input_tokens": 256, "max_tokens_per_batch": 256, "max_tokens_per_request": 512,
                "max_batches_in_flight": 1}))
    config = config.with_output_names(output_names(open_checkpoint(config.checkpoint_path)))
    config_json = config.model_dump(mode="json")
    plan = placement_for(config)
    model = RewardModelDeployment.options(
        placement_group_bundles=plan.bundles, placement_group_strategy=plan.strategy,
        ray_actor_options={"num_cpus": config.runtime.replica_cpus},
        max_ongoing_requests=config.model_max_ongoing_calls,  # as serve_app.build_app
    ).bind(config_json, engine_factory=slow_engine)
    deploy(Router.bind(model, ScoringDeployment.bind(config_json), config_json), name="leaving",
           route_prefix="/leaving")
    prefix = f"{serve_http}/leaving"
    words = "bread butter olive salt water flour yeast honey".split()

    def conversation(topic: str, length: int) -> dict:
        question = " ".join(words[(i + len(topic)) % len(words)] for i in range(length))
        return {"messages": [{"role": "user", "content": f"{topic}: {question}"},
                             {"role": "assistant", "content": "Noted."}]}

    a_body = {"conversations": [conversation("first", 70), conversation("second", 70)]}
    c_body = {"conversations": [conversation("third", 5)]}
    routers = serve.get_deployment_handle("Router", app_name="leaving")

    async def batches_started() -> int:
        return (await routers.routed_requests.remote())["batches"]

    async def scenario() -> tuple[httpx.Response, int]:
        async with httpx.AsyncClient(base_url=prefix, timeout=120) as a_client, \
                httpx.AsyncClient(base_url=prefix, timeout=120) as c_client:
            a = asyncio.ensure_future(a_client.post("/v1/score", json=a_body))
            await poll(1, "batch 1 (A's first prompt) in the model")
            c = asyncio.ensure_future(c_client.post("/v1/score", json=c_body))
            await poll(2, "batch 2 (A's second prompt and C's) in the model")
            a.cancel()  # A's client leaves: the connection closes while batch 2 computes
            with pytest.raises(asyncio.CancelledError):
                await a
            return await c, await batches_started()

    async def poll(batches: int, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while await batches_started() != batches:
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
            await asyncio.sleep(0.05)

    try:
        c_answer, batches = asyncio.run(scenario())
        assert c_answer.status_code == 200, c_answer.text
        assert batches == 2  # C rode in batch 2 beside A's second prompt, as the scenario needs
        with httpx.Client(base_url=prefix, timeout=120) as http:
            alone = http.post("/v1/score", json=c_body)
            assert alone.status_code == 200, alone.text
            again = http.post("/v1/score", json=a_body)  # the service still answers A's prompts
            assert again.status_code == 200, again.text
        assert c_answer.json()["results"][0]["score"] == pytest.approx(alone.json()["results"][0]["score"], abs=1e-5)
        assert c_answer.json()["results"][0]["num_tokens"] < 128 < min(
            r["num_tokens"] for r in again.json()["results"])
    finally:
        serve.delete("leaving")


def test_dead_worker_is_restarted_alone(ray_cluster, demo_checkpoint, reference_scorer, tokenizer):
    """TP 2 x PP 2: rank 0 (which hosts the process groups' rendezvous) is killed with SIGKILL. Batches fail with
    the unavailable error ("recovering") while only that rank is restarted in its bundle and reads its shard;
    the survivors keep their actors (and weights) and rejoin new process groups with it. Afterwards the scores
    equal the reference and the engine is neither broken nor recovering (no replica replacement needed)."""
    import os
    import signal

    from ray._private.state import actors as gcs_actor_table
    from ray.util.placement_group import placement_group, remove_placement_group

    from sharding.engine import MegatronEngine
    from sharding.placement import placement_for

    prompts = ["Hello there.", "What is 2 + 2?", "List three prime numbers. " * 5, "ok"]
    clean = [tokenizer.encode(f"<extra_id_1>User\n{p}\n<extra_id_1>Assistant\nSure.\n<extra_id_2>") for p in prompts]
    reference = reference_scorer.score(clean)
    config = ServiceConfig.model_validate(service_args(
        demo_checkpoint, parallel={"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "batch_layout": "padded",
                                   "max_tokens_per_micro_batch": 2 * max(len(t) for t in clean)},
        runtime={"gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5}))
    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=60)
    engine = None
    victim = 0
    try:
        engine = MegatronEngine(config, pg)
        np.testing.assert_allclose(asyncio.run(engine.score(clean)), reference, atol=1e-5, rtol=0)
        before = engine.describe()
        os.kill(gcs_actor_table(before[victim]["actor_id"])["Pid"], signal.SIGKILL)

        errors: list[str] = []
        deadline = time.monotonic() + 180
        while True:
            assert time.monotonic() < deadline, f"no recovery: {errors[-3:]}"
            assert engine.broken is None, engine.broken
            try:
                after = asyncio.run(engine.score(clean))
                break
            except EngineUnavailableError as e:
                errors.append(e.message)
            if engine.recovering:
                with pytest.raises(EngineUnavailableError, match="recovering"):
                    asyncio.run(engine.check_health())
            time.sleep(0.2)
        assert errors and all("recovering" in m for m in errors), errors
        np.testing.assert_allclose(after, reference, atol=1e-5, rtol=0)
        now = engine.describe()
        assert now[victim]["actor_id"] != before[victim]["actor_id"]
        assert now[victim]["bundle_index"] == before[victim]["bundle_index"]
        assert [w["actor_id"] for w in now if w["rank"] != victim] == [
            w["actor_id"] for w in before if w["rank"] != victim]  # the survivors kept their actors and weights
        assert engine.broken is None and engine.recovering is None and engine.restarts == 1
        asyncio.run(engine.check_health())
        np.testing.assert_allclose(asyncio.run(engine.score(clean[::-1])), reference[::-1], atol=1e-5, rtol=0)
    finally:
        if engine is not None:
            engine.shutdown()
        remove_placement_group(pg)
