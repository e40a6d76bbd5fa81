"""The HTTP ingress and handle entry point: validate -> render and tokenize -> batch to the model ->
weigh the attributes -> respond.

Routes: `POST /v1/score` (and the `score` handle method; their work in the `deployments.score_routes` mixin), the hosted API's `POST /v1/chat/completions`
and `GET /v1/models` (`deployments.openai_api`), `/health`, KServe v2 / Triton `/v2/...` (their work in
the `deployments.kserve_routes` mixin), OpenRLHF's `POST /get_reward` and vLLM's `POST /classify` and
`POST /pooling` (their work in the `deployments.rlhf_routes` mixin). The app, its middleware and the error mapping are
`deployments.http_app`. Every scoring route goes through the same path, `_score_tokens`: its prompts of all
concurrent requests share one pull-based token-budget queue per replica (`deployments.batcher`), built in
`__init__` from the service config: a batch of up to `max_tokens_per_batch` computed tokens (after prefix
sharing) leaves as soon as fewer than `max_batches_in_flight` are in flight, its prompts chosen by deficit
round robin (`deployments.scheduler`); past `max_queued_tokens` a request gets 503 + Retry-After. Admission
(`deployments.admission`) refuses a request the router cannot take before its body is read or tokenized, and
carries its deadline to the batcher.
Each batch makes one model call and one `ScoringDeployment.weigh` call (each prompt with its request's weights),
not one scoring call per request.
Errors leave as the typed errors of `deployments.errors`: as JSON in one shape over HTTP, as the same
types to handle callers. The optional API key (`deployments.auth`) and the request metrics
(`deployments.metrics`) live in the HTTP middleware. Request limits (`deployments.limits`, body size in
`deployments.http_body`) are checked before the work they bound; tokenization and KServe decoding run on a
bounded thread pool. No torch here, directly or indirectly.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Hashable, NamedTuple

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from configs.service import ServiceConfig
from deployments.affinity_routes import AffinityRoutes, carried_scope, scope_from
from deployments.admission import AdmissionGate, RequestScope, current_scope, parse_timeout
from deployments.auth import ApiKeyCheck, load_api_key
from deployments.batcher import RequestUsage, TokenBatcher
from deployments.chat_template import prompt_format_for
from deployments.errors import (
    InputTooLongError,
    InvalidRequestError,
    NotFoundError,
    ServiceError,
    ServiceUnavailableError,
)
from deployments.http_app import app, as_service_error, error_response_for, route_name
from deployments.http_body import request_id as _request_id
from deployments.kserve_routes import KServeRoutes
from deployments.limits import check_handle_request_size, check_messages, check_tokens, parse_json
from deployments.metrics import RouterMetrics
from deployments.router_affinity import affinity_key, messages_affinity_key
from deployments.model_routing import (
    FAILOVER_ATTEMPTS,
    FAILOVER_BACKOFF_S,
    batches_in_flight_for,
    fails_over,
    follow_model_replicas,
)
from deployments.openai_api import ChatCompletionRequest, chat_completion_body, models_body
from deployments.openapi_docs import (
    ERROR_RESPONSES,
    KSERVE_ERROR_RESPONSES,
    KSERVE_INFER_DOCS,
    KSERVE_OPEN_ERROR_RESPONSES,
    OPEN_ERROR_RESPONSES,
    json_body_docs,
)
from deployments.openrlhf_api import GetRewardRequest, GetRewardResponse
from deployments.prompt_faults import PromptFaults
from deployments.readiness import ModelReadiness
from deployments.rlhf_routes import RLHFRoutes
from deployments.score_routes import ScoreRoutes
from deployments.scoring import PromptWeights, WeightsObject, scored_rows
from deployments.schemas import ScoreRequest, ScoreResponse
from deployments.vllm_api import ClassifyRequest, ClassifyResponse, PoolingRequest, PoolingResponse
from sharding.checkpoints.formats import open_checkpoint

logger = logging.getLogger("ray.serve")


class ModelScores(NamedTuple):
    """One request's model output: float32 [N, A] attributes, float64 [N] weighted scores, per prompt its named
    rewards (None without named weights), and what the batches it rode in cost
    (`deployments.batcher.RequestUsage`)."""

    attributes: np.ndarray
    scores: np.ndarray
    rewards: list[dict[str, float] | None]
    usage: RequestUsage | None = None


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Router(ScoreRoutes, KServeRoutes, RLHFRoutes, AffinityRoutes):
    def __init__(self, model_handle: Any, scoring_handle: Any, config: dict[str, Any]):
        self._cfg = ServiceConfig.model_validate(config)
        checkpoint = open_checkpoint(self._cfg.checkpoint_path)
        self._cfg.check_against(checkpoint.arch)  # token budget vs limit, names vs head (as build_app)
        self._limit_tokens = self._cfg.max_input_tokens(checkpoint.arch)
        self._prompt = prompt_format_for(checkpoint)
        self._model = model_handle
        self._readiness = ModelReadiness(model_handle)
        self._scoring = scoring_handle
        self._metrics = RouterMetrics(self._cfg.parallel, device=self._cfg.device_label)
        self._limits = self._cfg.router
        self._tokenizer_pool = ThreadPoolExecutor(self._limits.tokenizer_threads, thread_name_prefix="tokenize")
        app.state.max_request_bytes = self._limits.max_request_bytes
        # Read once here; the HTTP middleware checks scoring routes against it and counts requests.
        app.state.api_key_check = ApiKeyCheck(load_api_key(self._cfg.auth))
        app.state.metrics = self._metrics
        app.state.device_label = self._cfg.device_label  # every HTTP answer carries it (X-Reward-Device)
        # One pull-based queue per replica (deployments.batcher): a batch leaves when a slot is free.
        self._batcher = TokenBatcher(
            self._run_model_batch,
            max_tokens_per_batch=self._cfg.router.max_tokens_per_batch,
            long_request_tokens_per_batch=self._cfg.router.long_request_tokens_per_batch,
            max_batches_in_flight=batches_in_flight_for(self._cfg, running_model_replicas=None),
            max_queued_tokens=self._cfg.router.max_queued_tokens,
        )
        self._admission = AdmissionGate(self._batcher, self._limits.max_ongoing_requests,
                                        self._limits.max_queued_tokens, self._limits.max_timeout_s)
        app.state.admission = self._admission  # the HTTP middleware admits scoring requests before their body
        self._replica_follower: asyncio.Task | None = None
        self._routers: Any = None  # handle to the Router deployment (prefix affinity), made on first use
        self._affinity_prompts: dict[str | None, int] = {}  # requests scored here as their key's home
        self._prompt_faults = PromptFaults()  # per-prompt faults from the model (deployments.prompt_faults)

    @property
    def max_input_tokens(self) -> int:
        return self._limit_tokens

    # --- the one scoring path: token lists -> token-budget batches -> model -> [N, A] attributes --------

    async def _run_model_batch(self, token_lists: list[list[int]], weights: list[PromptWeights]
                               ) -> tuple[np.ndarray, str]:
        """One model call and one scoring call for a token-budget batch: float64 [B, A + 1], the attributes
        then each prompt's weighted score (with its request's weights; None: the service's), and the model
        replica that computed it; named rewards are set on each prompt's `PromptWeights`."""
        self._metrics.batch_started(token_lists)
        started_s = time.perf_counter()
        try:
            for attempt in range(FAILOVER_ATTEMPTS):
                try:
                    output, replica = await self._model.score_tagged.remote(token_lists)
                    break
                except Exception as exc:  # noqa: BLE001 - only a failed model replica is retried
                    if not fails_over(self._cfg, exc, attempt):
                        raise
                    await asyncio.sleep(FAILOVER_BACKOFF_S * (attempt + 1))
        finally:
            self._metrics.batch_finished(time.perf_counter() - started_s)
        output = self._prompt_faults.unpack(output, token_lists)  # per-prompt faults: deployments.prompt_faults
        attributes = np.asarray(output, dtype=np.float32)
        expected = (len(token_lists), len(self._cfg.scoring.attribute_names))
        if attributes.shape != expected:
            raise RuntimeError(f"the model returned shape {attributes.shape}; expected {list(expected)}")
        weighed = await self._scoring.weigh.remote(attributes, [w.weights for w in weights])
        for prompt, rewards in zip(weights, weighed.rewards or ()):
            prompt.rewards = rewards
        scores = np.asarray(weighed.scores, dtype=np.float64)
        return np.column_stack([attributes.astype(np.float64), scores]), replica

    def _follow_model_replicas(self) -> None:
        """Under model autoscaling, keeps the batcher's cap at the running replicas' share (started on first use)."""
        if self._cfg.model.autoscaling is not None and self._replica_follower is None:
            self._replica_follower = asyncio.get_running_loop().create_task(
                follow_model_replicas(self._cfg, self._batcher))

    async def _score_tokens(self, token_lists: Sequence[list[int]], param: str | None = None,
                            weights: WeightsObject = None) -> ModelScores:
        """Attributes and weighted scores of a request's prompts: they enter the replica's batch queue at once,
        together (after the per-request token limit), with what is left of the request's deadline; `weights`
        are the request's own (None: the service's)."""
        check_tokens(sum(len(ids) for ids in token_lists), self._limits, param)
        self._follow_model_replicas()
        scope = current_scope.get() or RequestScope(arrived_s=time.perf_counter())
        job = await self._in_pool(TokenBatcher.prepare, token_lists, scope.tenant)  # sorting: off the loop
        submitted_s = time.perf_counter()
        extras = [PromptWeights(weights) for _ in token_lists]
        rows, usage = await self._batcher.submit(job, extras, timeout_s=scope.remaining_s())
        if usage.queue_ms is not None:
            self._metrics.request_timed(usage.queue_ms / 1e3, submitted_s - scope.arrived_s + usage.queue_ms / 1e3)
        attributes = rows[:, :-1].astype(np.float32)  # exact: the model's float32 values
        bad = np.flatnonzero(~np.isfinite(attributes).all(axis=1))
        if bad.size:
            fault = self._prompt_faults.message_for(token_lists[int(bad[0])])  # deployments.prompt_faults
            if fault is not None:
                raise ServiceError(f"the model failed on prompt {int(bad[0])} of the request: {fault}")
            raise ServiceError(f"the model returned non-finite attributes (nan or inf) for prompt {int(bad[0])} of "
                               f"the request ({bad.size} in all); no score is given")
        return ModelScores(attributes, rows[:, -1], [extra.rewards for extra in extras], usage)

    def _scored_rows(self, scores: ModelScores, weights: WeightsObject, rewards: bool = True) -> list[dict[str, Any]]:
        """`{"score", "attributes"}` (and `"rewards"`) per prompt (`deployments.scoring.scored_rows`: an overflowing
        value is an error); `weights`: the request's own."""
        return scored_rows(self._cfg.scoring.attribute_names, scores.attributes, scores.scores, weights,
                           scores.rewards if rewards else None)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """CPU work of a request (tokenizing, fitting, decoding KServe bodies) on the bounded tokenizer pool."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool,
                                                                functools.partial(fn, *args, **kwargs))

    # --- POST /v1/score and the handle ------------------------------------------------------------------

    async def _score_at_home(self, request: ScoreRequest) -> dict[str, Any] | ScoreResponse:
        """Scores here with one router replica; with several, at the request's home router (prefix affinity,
        `deployments.router_affinity`), which may be this one."""
        if self._cfg.router.max_replicas < 2:
            return await self._score_validated(request)
        body = request.model_dump(mode="json", exclude_unset=True)
        return await self._router_handle().score_routed.remote(body, affinity_key=affinity_key(request),
                                                                scope=carried_scope())

    async def score_routed(self, request: dict[str, Any], affinity_key: str | None = None,
                           scope: tuple[Hashable, float | None] | None = None) -> dict[str, Any]:
        """A request another router replica handed to this one, its home for `affinity_key` (Serve's request
        router chose this replica by the key); scored here under the sender's tenant and what is left of its
        deadline (`scope`, `deployments.affinity_routes.carried_scope`)."""
        self._affinity_prompts[affinity_key] = self._affinity_prompts.get(affinity_key, 0) + 1

        async def scoring() -> Any:
            token = current_scope.set(scope_from(scope))
            try:
                return await self._score_validated(await self._validated_in_scope(request))
            finally:
                current_scope.reset(token)

        return await self._typed_errors(scoring)

    async def routed_requests(self, affinity_key: str | None = None) -> dict[str, Any]:
        """This replica's id, the requests it scored as their key's home by key, and its model batches' totals
        (batches, requested and computed tokens). With several routers, a key reaches that key's home."""
        return {"replica_id": serve.get_replica_context().replica_id.unique_id,
                "requests": {str(k): n for k, n in self._affinity_prompts.items()}, **self._metrics.totals}

    async def score(self, request: dict[str, Any] | ScoreRequest, timeout_s: float | None = None) -> dict[str, Any]:
        """Handle entry point: same admission, validation and typed errors as `POST /v1/score`; returns its JSON.
        `timeout_s` is the request's deadline (as the body's `timeout_s`, which may shorten it)."""
        async def scoring() -> Any:
            check_handle_request_size(request, self._limits)
            scope = self._admission.admit(None, parse_timeout(timeout_s, "timeout_s", self._limits.max_timeout_s))
            token = current_scope.set(scope)
            try:
                return await self._score_at_home(await self._validated_in_scope(request))
            finally:
                self._admission.release()
                current_scope.reset(token)

        return await self._typed_errors(scoring)

    @staticmethod
    async def _typed_errors(scoring: Callable[[], Any]) -> dict[str, Any]:
        """Runs `scoring()` (validation included) and re-raises any error as the typed error a caller catches."""
        try:
            response = await scoring()
        except Exception as exc:  # re-raise as the typed error a caller can catch
            error = as_service_error(exc)
            if error is None:
                raise
            raise error from None
        return response if isinstance(response, dict) else response.model_dump(mode="json")

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
              openapi_extra=json_body_docs(ScoreRequest))
    async def score_http(self, http_request: Request) -> Any:
        try:
            return await self._score_at_home(await self._validated_in_scope(await http_request.body()))
        except Exception as exc:
            return self._http_error(exc, http_request)

    # --- NIM / OpenAI chat completions --------------------------------------------------------------------

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES, openapi_extra=json_body_docs(ChatCompletionRequest))
    async def chat_completions(self, http_request: Request) -> Any:
        try:
            raw = await self._in_pool(parse_json, await http_request.body())
            if isinstance(raw, dict) and isinstance(raw.get("messages"), list):
                check_messages(len(raw["messages"]), self._limits, "messages")
            body = ChatCompletionRequest.model_validate(raw)
            self._check_model(body.model, accepted=(self._cfg.model_name,), param="model")
            return await self._at_home("chat_completions", (body, _request_id(http_request)),
                                       messages_affinity_key(body.messages))
        except Exception as exc:
            return self._http_error(exc, http_request)

    async def _chat_completions_work(self, payload: tuple[ChatCompletionRequest, str]) -> dict[str, Any]:
        body, request_id = payload
        prompt = await self._in_pool(
            self._prompt.tokenize_conversation, body.messages, max_tokens=self._limit_tokens, field="messages"
        )
        attributes = (await self._score_tokens([prompt.token_ids], "messages")).attributes
        named = {name: float(v) for name, v in zip(self._cfg.scoring.attribute_names, attributes[0])}
        return chat_completion_body(request_id, self._cfg.model_name, named, prompt.num_tokens)

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return models_body(self._cfg.model_name, self._cfg.device_label)

    # --- KServe v2 / Triton: the routes; their work is `deployments.kserve_routes` -------------------------

    @app.post("/v2/models/{model_name}/infer", responses=KSERVE_ERROR_RESPONSES, openapi_extra=KSERVE_INFER_DOCS)
    @app.post("/v2/models/{model_name}/versions/{model_version}/infer", responses=KSERVE_ERROR_RESPONSES,
              openapi_extra=KSERVE_INFER_DOCS)
    async def kserve_infer(self, model_name: str, http_request: Request, model_version: str | None = None) -> Response:
        return await self._kserve_infer(model_name=model_name, http_request=http_request, model_version=model_version)

    @app.get("/v2")
    async def kserve_server_metadata(self) -> dict[str, Any]:
        return await self._kserve_server_metadata()

    @app.get("/v2/health/live")
    async def kserve_live(self) -> dict[str, bool]:
        return await self._kserve_live()

    @app.get("/v2/health/ready")
    async def kserve_ready(self) -> dict[str, bool]:
        return await self._kserve_ready()

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{model_version}")
    async def kserve_model_metadata(self, model_name: str, model_version: str | None = None) -> dict[str, Any]:
        return await self._kserve_model_metadata(model_name=model_name, model_version=model_version)

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{model_version}/ready")
    async def kserve_model_ready(self, model_name: str, model_version: str | None = None) -> dict[str, Any]:
        return await self._kserve_model_ready(model_name=model_name, model_version=model_version)

    @app.get("/v2/models/{model_name}/config", responses=KSERVE_OPEN_ERROR_RESPONSES)
    @app.get("/v2/models/{model_name}/versions/{model_version}/config", responses=KSERVE_OPEN_ERROR_RESPONSES)
    async def kserve_model_config(self, model_name: str, model_version: str | None = None) -> dict[str, Any]:
        return await self._kserve_model_config(model_name=model_name, model_version=model_version)

    @app.post("/v2/repository/index")
    async def kserve_repository_index(self) -> list[dict[str, str]]:
        return await self._kserve_repository_index()

    # --- OpenRLHF /get_reward, vLLM /classify and /pooling: `deployments.rlhf_routes` ----------------------

    @app.post("/get_reward", response_model=GetRewardResponse, responses=ERROR_RESPONSES)
    async def get_reward(self, body: GetRewardRequest, http_request: Request) -> Any:
        return await self._get_reward(body=body, http_request=http_request)

    @app.post("/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
    async def classify(self, body: ClassifyRequest, http_request: Request) -> Any:
        return await self._classify(body=body, http_request=http_request)

    @app.post("/pooling", response_model=PoolingResponse, responses=ERROR_RESPONSES)
    async def pooling(self, body: PoolingRequest, http_request: Request) -> Any:
        return await self._pooling(body=body, http_request=http_request)

    # --- shared -------------------------------------------------------------------------------------------

    def _check_count(self, count: int, field: str) -> None:
        """Items of one request (conversations, KServe rows, queries): at most `max_conversations_per_request`."""
        limit = self._cfg.router.max_conversations_per_request
        if count > limit:
            raise InvalidRequestError(f"{field} has {count} items; the limit is {limit}", param=field)

    @staticmethod
    def _check_model(name: str, accepted: Sequence[str], param: str) -> None:
        if name not in accepted:
            raise NotFoundError(f"model {name!r} is not served here; this service serves {accepted[-1]!r}", param=param)

    def _http_error(self, exc: Exception, http_request: Request) -> JSONResponse:
        """The one error shape for whatever a route raised; unexpected errors become a logged 500."""
        request_id = _request_id(http_request)
        error = as_service_error(exc)
        if error is None:
            logger.exception("request %s failed", request_id)
            error = ServiceError("internal error; see the server log for request id " + request_id)
        else:
            logger.info("request %s failed: %s", request_id, error.message)
            if isinstance(error, InputTooLongError):
                self._metrics.rejected_too_long(route_name(http_request))
        return error_response_for(error, http_request)

    @app.get("/health", responses=OPEN_ERROR_RESPONSES)
    async def health(self) -> dict[str, str]:
        return await self._ready_or_503({"status": "ok"})

    async def drain(self, timeout_s: float) -> int:
        """Refuses new HTTP requests (503) and waits, at most `timeout_s`, until those in flight have their
        answers; returns how many are still in flight. Graceful stop: drain, then shut Serve down."""
        app.state.draining = True
        deadline = time.monotonic() + timeout_s
        while getattr(app.state, "in_flight", 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return getattr(app.state, "in_flight", 0)

    async def _ready_or_503(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` when the model is ready (`deployments.readiness`); raises the 503 (rendered in the route's
        error shape by the ServiceError handler) while it loads or is broken."""
        reason = await self._readiness.not_ready()
        if reason is not None:
            raise ServiceUnavailableError(f"the model is not ready: {reason}")
        return body
