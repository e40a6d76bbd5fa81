"""The HTTP ingress and handle entry point: validate -> render and tokenize -> batch to the model ->
weigh the attributes -> respond.

Conversations of all concurrent requests share one token-budget batch queue (`serve.batch` with
`batch_size_fn` = total tokens), built per replica in `__init__` from `RouterConfig`, so the budget, the
wait and the number of batches in flight all come from the service config. Errors leave as the typed
errors of `deployments.errors`: as JSON in one shape over HTTP, as the same types to handle callers.
No torch here, directly or indirectly.
"""

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from configs.service import ServiceConfig
from deployments.errors import (
    InvalidRequestError,
    ServiceError,
    ServiceUnavailableError,
    unwrap_service_error,
)
from deployments.prompt import SentencePieceTokenizer, TokenizedPrompt, tokenize_conversation
from deployments.schemas import ScoreRequest, ScoreResponse, ScoreResult, Usage, invalid_request_from_errors
from sharding.nemo_archive import NemoCheckpoint
from sharding.protocol import EngineUnavailableError

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
_UNAVAILABLE_ERRORS = (EngineUnavailableError, RayActorError, BackPressureError, DeploymentUnavailableError)

app = FastAPI(title="Reward scoring service")


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


def _request_id(request: Request) -> str:
    """The caller's X-Request-Id (Serve's proxy adds one when missing), else a new one; cached."""
    cached = getattr(request.state, "request_id", None)
    if cached:
        return cached
    given = request.headers.get(REQUEST_ID_HEADER, "").strip()
    request.state.request_id = given[:MAX_REQUEST_ID_CHARS] if given else uuid.uuid4().hex
    return request.state.request_id


def _error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content=error.to_body())


@app.middleware("http")
async def _request_id_middleware(request: Request, call_next):
    request_id = _request_id(request)
    response = await call_next(request)
    # Serve's proxy already echoes X-Request-Id on every response; set it only when nobody else will.
    if REQUEST_ID_HEADER not in request.headers and REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


@app.exception_handler(RequestValidationError)
async def _on_request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = invalid_request_from_errors(exc.errors(), body_prefix=True)
    logger.info("request %s rejected: %s", _request_id(request), error.message)
    return _error_response(error)


@app.exception_handler(ServiceError)
async def _on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return _error_response(exc)


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Router:
    def __init__(self, model_handle: Any, scoring_handle: Any, config: dict[str, Any]):
        self._cfg = ServiceConfig.model_validate(config)
        checkpoint = NemoCheckpoint.open(self._cfg.checkpoint_path)
        arch = checkpoint.arch
        self._limit_tokens = self._cfg.max_input_tokens(arch)
        budget_tokens = self._cfg.router.max_tokens_per_batch
        if budget_tokens < self._limit_tokens:
            raise ValueError(
                f"router.max_tokens_per_batch {budget_tokens} is below the per-conversation limit "
                f"{self._limit_tokens}"
            )
        num_attributes = len(self._cfg.scoring.attribute_names)
        if num_attributes != arch.num_attributes:
            raise ValueError(
                f"scoring.attribute_names has {num_attributes} names; the reward head has {arch.num_attributes}"
            )
        self._tokenizer = SentencePieceTokenizer(checkpoint.tokenizer_path)
        self._model = model_handle
        self._scoring = scoring_handle
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

    async def _run_model_batch(self, token_lists: list[list[int]]) -> list[np.ndarray]:
        """One model call for a token-budget batch; splits the [B, A] result back per conversation."""
        output = await self._model.score.remote(token_lists)
        attributes = np.asarray(output, dtype=np.float32)
        expected = (len(token_lists), len(self._cfg.scoring.attribute_names))
        if attributes.shape != expected:
            raise RuntimeError(f"the model returned shape {attributes.shape}; expected {list(expected)}")
        return [attributes[i] for i in range(len(token_lists))]

    def _validate(self, body: ScoreRequest | dict[str, Any]) -> ScoreRequest:
        request = body if isinstance(body, ScoreRequest) else ScoreRequest.model_validate(body)
        limit = self._cfg.router.max_conversations_per_request
        if len(request.conversations) > limit:
            raise InvalidRequestError(
                f"conversations has {len(request.conversations)} items; the limit is {limit}",
                param="conversations",
            )
        num_attributes = len(self._cfg.scoring.attribute_names)
        if request.weights is not None and len(request.weights) != num_attributes:
            raise InvalidRequestError(
                f"weights has {len(request.weights)} values; the model has {num_attributes} attributes "
                f"({', '.join(self._cfg.scoring.attribute_names)})",
                param="weights",
            )
        return request

    def _tokenize(self, request: ScoreRequest) -> list[TokenizedPrompt]:
        return [
            tokenize_conversation(
                conversation.messages,
                self._tokenizer,
                max_tokens=self._limit_tokens,
                truncate=request.truncate,
                conversation_index=index,
            )
            for index, conversation in enumerate(request.conversations)
        ]

    async def _score_validated(self, request: ScoreRequest) -> ScoreResponse:
        prompts = await asyncio.to_thread(self._tokenize, request)
        rows = await asyncio.gather(*(self._score_tokens(prompt.token_ids) for prompt in prompts))
        scored = await self._scoring.score.remote(np.stack(rows), request.weights)
        results = [
            ScoreResult(
                index=i,
                score=item["score"],
                attributes=item["attributes"],
                num_tokens=prompt.num_tokens,
                truncated=prompt.truncated,
            )
            for i, (item, prompt) in enumerate(zip(scored, prompts))
        ]
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

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score_http(self, body: ScoreRequest, http_request: Request) -> Any:
        request_id = _request_id(http_request)
        try:
            return await self._score_validated(self._validate(body))
        except Exception as exc:
            error = as_service_error(exc)
            if error is None:
                logger.exception("request %s failed", request_id)
                error = ServiceError("internal error; see the server log for request id " + request_id)
            else:
                logger.info("request %s failed: %s", request_id, error.message)
            return _error_response(error)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}
