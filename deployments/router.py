"""The HTTP ingress and handle entry point: validate -> render and tokenize -> batch to the model ->
weigh the attributes -> respond.

Routes: `POST /v1/score` (and the `score` handle method), the hosted API's `POST /v1/chat/completions`
and `GET /v1/models` (`deployments.openai_api`), KServe v2 / Triton `/v2/...` (`deployments.kserve_api`),
and `/health`. Every scoring route goes through the same path, `_attributes_for`: its prompts of all
concurrent requests share one token-budget batch queue (`serve.batch` with `batch_size_fn` = total
tokens), built per replica in `__init__` from `RouterConfig`, so the budget, the wait and the number of
batches in flight all come from the service config. Errors leave as the typed errors of
`deployments.errors`: as JSON in one shape over HTTP, as the same types to handle callers. The optional
API key (`deployments.auth`) and the request metrics (`deployments.metrics`) live in the HTTP middleware.
Request limits (`deployments.limits`, body size in `deployments.http_body`) are checked before the work
they bound; tokenization and KServe decoding run on a bounded thread pool. No torch here, directly or
indirectly.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from configs.service import ServiceConfig
from deployments.auth import ApiKeyCheck, load_api_key
from deployments.errors import (
    InputTooLongError,
    InvalidRequestError,
    NotFoundError,
    ServiceError,
    ServiceUnavailableError,
    unwrap_service_error,
)
from deployments.kserve_api import (
    HEADER_LENGTH,
    SERVED_MODEL_NAME,
    InferRequest,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
    token_lists,
)
from deployments.http_body import (
    REQUEST_ID_HEADER,
    BodyLimitMiddleware,
    error_response,
    install_error_handlers,
    route_path,
)
from deployments.http_body import request_id as _request_id
from deployments.limits import (
    check_messages,
    check_prompts,
    check_raw_score_request,
    check_score_request,
    check_tokens,
    parse_json,
)
from deployments.metrics import RouterMetrics
from deployments.openapi_docs import ERROR_RESPONSES, KSERVE_INFER_DOCS, install_openapi, json_body_docs
from deployments.openai_api import ChatCompletionRequest, chat_completion_body, models_body
from deployments.chat_template import prompt_format_for
from deployments.prompt import TokenizedPrompt
from deployments.schemas import (
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    TurnResult,
    Usage,
    invalid_request_from_errors,
)
from sharding.formats import open_checkpoint
from sharding.protocol import EngineUnavailableError

logger = logging.getLogger("ray.serve")

SERVICE_VERSION = "0.1.0"
SCORING_PATHS = frozenset({"/v1/score", "/v1/chat/completions"})
_UNAVAILABLE_ERRORS = (EngineUnavailableError, RayActorError, BackPressureError, DeploymentUnavailableError)

app = FastAPI(title="Reward scoring service")
# Inside the request middleware below (added later = outer), so a keyless request gets 401 before its body is read.
app.add_middleware(BodyLimitMiddleware, limit_bytes=lambda: getattr(app.state, "max_request_bytes", None))
install_error_handlers(app)
install_openapi(app)


def count_tokens(token_lists: Sequence[Sequence[int]]) -> int:
    """`batch_size_fn` of the model queue: a batch's size is its total tokens."""
    return sum(len(ids) for ids in token_lists)


def as_service_error(exc: BaseException) -> ServiceError | None:
    """Maps an error from our code or a downstream handle onto the typed error a client should see;
    None when it is not the client's business (it then becomes a 500 / is re-raised)."""
    service_error = unwrap_service_error(exc)
    if service_error is not None:
        return service_error
    if isinstance(exc, ValidationError):
        return invalid_request_from_errors(exc.errors())
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        cause = getattr(exc, "cause", None) or exc
        message = getattr(cause, "message", None) or str(cause).strip().splitlines()[-1]
        return ServiceUnavailableError(f"the model is unavailable, retry later: {message}")
    return None


def _error_response(error: ServiceError, request: Request) -> JSONResponse:
    return error_response(error, request.scope)


def requires_api_key(path: str) -> bool:
    """The scoring routes; health, metadata and model listing stay open."""
    return path in SCORING_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


@app.middleware("http")
async def _request_middleware(request: Request, call_next):
    """Request id, API key (before any body parsing, so a keyless request always gets 401), and the
    per-route request counter."""
    request_id = _request_id(request)
    if requires_api_key(route_path(request.scope)):
        try:
            request.app.state.api_key_check.check(request.headers.get("authorization"))
        except AttributeError:  # the router has not finished starting: never serve unchecked
            response = _error_response(ServiceUnavailableError("the service is starting, retry later"), request)
        except ServiceError as error:
            logger.info("request %s rejected: %s", request_id, error.message)
            response = _error_response(error, request)
        else:
            response = await call_next(request)
    else:
        response = await call_next(request)
    # Serve's proxy already echoes X-Request-Id on every response; set it only when nobody else will.
    if REQUEST_ID_HEADER not in request.headers and REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = request_id
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.request(_route_name(request), response.status_code)
    return response


def _route_name(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Router:
    def __init__(self, model_handle: Any, scoring_handle: Any, config: dict[str, Any]):
        self._cfg = ServiceConfig.model_validate(config)
        checkpoint = open_checkpoint(self._cfg.checkpoint_path)
        self._cfg.check_against(checkpoint.arch)  # token budget vs limit, names vs head (as build_app)
        self._limit_tokens = self._cfg.max_input_tokens(checkpoint.arch)
        budget_tokens = self._cfg.router.max_tokens_per_batch
        self._prompt = prompt_format_for(checkpoint)
        self._model = model_handle
        self._scoring = scoring_handle
        self._metrics = RouterMetrics(self._cfg.parallel.micro_batch_size)
        self._limits = self._cfg.router
        self._tokenizer_pool = ThreadPoolExecutor(self._limits.tokenizer_threads, thread_name_prefix="tokenize")
        app.state.max_request_bytes = self._limits.max_request_bytes
        # Read once here; the HTTP middleware checks scoring routes against it and counts requests.
        app.state.api_key_check = ApiKeyCheck(load_api_key(self._cfg.auth))
        app.state.metrics = self._metrics
        # One queue per replica, configured from the service config (decorator arguments are fixed at
        # import time; Serve's setters cover only the size and the wait, not max_concurrent_batches).
        self._score_tokens = serve.batch(
            max_batch_size=budget_tokens,
            batch_wait_timeout_s=self._cfg.router.batch_wait_timeout_s,
            max_concurrent_batches=self._cfg.router.max_concurrent_batches,
            batch_size_fn=count_tokens,
        )(self._run_model_batch)

    @property
    def max_input_tokens(self) -> int:
        return self._limit_tokens

    # --- the one scoring path: token lists -> token-budget batches -> model -> [N, A] attributes --------

    async def _run_model_batch(self, token_lists: list[list[int]]) -> list[np.ndarray]:
        """One model call for a token-budget batch; splits the [B, A] result back per prompt."""
        self._metrics.batch_started([len(ids) for ids in token_lists])
        started_s = time.perf_counter()
        try:
            output = await self._model.score.remote(token_lists)
        finally:
            self._metrics.batch_finished(time.perf_counter() - started_s)
        attributes = np.asarray(output, dtype=np.float32)
        expected = (len(token_lists), len(self._cfg.scoring.attribute_names))
        if attributes.shape != expected:
            raise RuntimeError(f"the model returned shape {attributes.shape}; expected {list(expected)}")
        return [attributes[i] for i in range(len(token_lists))]

    async def _attributes_for(self, token_lists: Sequence[list[int]], param: str | None = None) -> np.ndarray:
        """float32 [N, A]: every prompt of a request enters the shared batch queue at once (after the
        per-request token limit)."""
        check_tokens(sum(len(ids) for ids in token_lists), self._limits, param)
        rows = await asyncio.gather(*(self._score_tokens(ids) for ids in token_lists))
        attributes = np.stack(rows)
        bad = np.flatnonzero(~np.isfinite(attributes).all(axis=1))
        if bad.size:
            raise ServiceError(f"the model returned non-finite attributes (nan or inf) for prompt {int(bad[0])} of "
                               f"the request ({bad.size} in all); no score is given")
        return attributes

    async def _in_pool(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """CPU work of a request (tokenizing, fitting, decoding KServe bodies) on the bounded tokenizer pool."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool,
                                                                functools.partial(fn, *args, **kwargs))

    # --- POST /v1/score and the handle ------------------------------------------------------------------

    def _validate(self, body: ScoreRequest | dict[str, Any] | bytes) -> ScoreRequest:
        """A request body (bytes over HTTP, a dict or a ScoreRequest from a handle) checked against the limits
        (counts on the raw JSON first, before it becomes models) and validated."""
        if isinstance(body, ScoreRequest):
            request = body
        else:
            raw = parse_json(body) if isinstance(body, bytes) else body
            check_raw_score_request(raw, self._limits)
            request = ScoreRequest.model_validate(raw)
        check_score_request(request, self._limits)
        num_attributes = len(self._cfg.scoring.attribute_names)
        if request.weights is not None and len(request.weights) != num_attributes:
            raise InvalidRequestError(
                f"weights has {len(request.weights)} values; the model has {num_attributes} attributes "
                f"({', '.join(self._cfg.scoring.attribute_names)})",
                param="weights",
            )
        return request

    def _tokenize(self, request: ScoreRequest) -> list[list[tuple[int, TokenizedPrompt]]]:
        """Per conversation, its `(message index, prompt)` list: the last message only, or every assistant
        turn's prefix with `turns: "all"`."""
        out = []
        for index, conversation in enumerate(request.conversations):
            kwargs = dict(max_tokens=self._limit_tokens, truncate=request.truncate, conversation_index=index)
            if request.turns == "all":
                out.append(self._prompt.tokenize_turns(conversation.messages, **kwargs))
            else:
                last = len(conversation.messages) - 1
                out.append([(last, self._prompt.tokenize_conversation(conversation.messages, **kwargs))])
        return out

    async def _score_validated(self, request: ScoreRequest) -> ScoreResponse:
        per_conversation = await self._in_pool(self._tokenize, request)
        prompts = [prompt for turns in per_conversation for _, prompt in turns]
        self._metrics.truncated("/v1/score", sum(prompt.truncated for prompt in prompts))
        attributes = await self._attributes_for([prompt.token_ids for prompt in prompts])
        scored = iter(await self._scoring.score.remote(attributes, request.weights))
        results = []
        for index, turns in enumerate(per_conversation):
            turn_results = [
                TurnResult(message_index=message_index, num_tokens=prompt.num_tokens, truncated=prompt.truncated,
                           **next(scored))
                for message_index, prompt in turns
            ]
            last = turn_results[-1].model_dump(exclude={"message_index"})
            results.append(ScoreResult(index=index, turns=turn_results if request.turns == "all" else None, **last))
        usage = Usage(prompt_tokens=sum(prompt.num_tokens for prompt in prompts))
        return ScoreResponse(model=self._cfg.model_name, results=results, usage=usage)

    async def score(self, request: dict[str, Any] | ScoreRequest) -> dict[str, Any]:
        """Handle entry point: same validation and typed errors as `POST /v1/score`; returns its JSON."""
        try:
            response = await self._score_validated(self._validate(request))
        except Exception as exc:  # re-raise as the typed error a caller can catch
            error = as_service_error(exc)
            if error is None:
                raise
            raise error from None
        return response.model_dump(mode="json")

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
              openapi_extra=json_body_docs(ScoreRequest))
    async def score_http(self, http_request: Request) -> Any:
        try:
            return await self._score_validated(await self._in_pool(self._validate, await http_request.body()))
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
            prompt = await self._in_pool(
                self._prompt.tokenize_conversation, body.messages, max_tokens=self._limit_tokens, field="messages"
            )
            attributes = await self._attributes_for([prompt.token_ids], "messages")
            named = {name: float(v) for name, v in zip(self._cfg.scoring.attribute_names, attributes[0])}
            return chat_completion_body(_request_id(http_request), self._cfg.model_name, named, prompt.num_tokens)
        except Exception as exc:
            return self._http_error(exc, http_request)

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return models_body(self._cfg.model_name)

    # --- KServe v2 / Triton -------------------------------------------------------------------------------

    @app.post("/v2/models/{model_name}/infer", responses=ERROR_RESPONSES, openapi_extra=KSERVE_INFER_DOCS)
    async def kserve_infer(self, model_name: str, http_request: Request) -> Response:
        try:
            self._check_model(model_name, accepted=self._kserve_names, param="model_name")
            request = await self._in_pool(
                parse_infer_request,
                await http_request.body(),
                http_request.headers.get(HEADER_LENGTH),
                http_request.headers.get("content-encoding"),
                self._limits.max_request_bytes,
            )
            prompts = await self._in_pool(self._kserve_prompts, request)
            self._metrics.truncated("/v2/models/{model_name}/infer", sum(p.truncated for p in prompts))
            attributes = await self._attributes_for([prompt.token_ids for prompt in prompts], "inputs")
            exceeded = np.array([[int(prompt.truncated)] for prompt in prompts], dtype=np.int32)
            body, headers = encode_infer_response(model_name, request, {"rewards": attributes, "exceeded": exceeded})
            return Response(content=body, headers=headers)
        except Exception as exc:
            return self._http_error(exc, http_request)

    def _kserve_prompts(self, request: InferRequest) -> list[TokenizedPrompt]:
        """Over-long inputs are cut as `truncate: left` cuts a conversation and flagged `exceeded`; see README."""
        check_prompts(next(iter(request.tensors.values())).shape[0], self._limits, "inputs")
        sequences = token_lists(request, self._prompt.encode, self._prompt.vocab_size, self._prompt.eos_id)
        return [self._prompt.fit_token_ids(ids, max_tokens=self._limit_tokens) for ids in sequences]

    @property
    def _kserve_names(self) -> tuple[str, ...]:
        return (SERVED_MODEL_NAME, self._cfg.model_name)

    @app.get("/v2")
    async def kserve_server_metadata(self) -> dict[str, Any]:
        return server_metadata(SERVICE_VERSION)

    @app.get("/v2/health/live")
    async def kserve_live(self) -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def kserve_ready(self) -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/models/{model_name}")
    async def kserve_model_metadata(self, model_name: str, http_request: Request) -> Any:
        try:
            self._check_model(model_name, accepted=self._kserve_names, param="model_name")
        except ServiceError as error:
            return _error_response(error, http_request)
        return model_metadata(model_name, len(self._cfg.scoring.attribute_names))

    @app.get("/v2/models/{model_name}/ready")
    async def kserve_model_ready(self, model_name: str, http_request: Request) -> Any:
        try:
            self._check_model(model_name, accepted=self._kserve_names, param="model_name")
        except ServiceError as error:
            return _error_response(error, http_request)
        return {"name": model_name, "ready": True}

    # --- shared -------------------------------------------------------------------------------------------

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
                self._metrics.rejected_too_long(_route_name(http_request))
        return _error_response(error, http_request)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}
