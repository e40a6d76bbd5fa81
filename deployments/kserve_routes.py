"""KServe v2 / Triton HTTP routes of the router (NeMo-Aligner's reward server protocol, what PyTriton's and
tritonclient's clients call): server and model metadata, liveness and readiness, Triton's model config,
the repository index, and `infer`, each also under `/versions/{version}`. Request decoding and response
encoding live in `deployments.kserve_api`; errors under `/v2` come in KServe's `{"error": message}`
(`deployments.errors.error_body`).

A mixin of `deployments.router.Router`, which declares the routes themselves (a route method must be the
ingress class's own: Serve pickles the app with it, and an inherited method's patched signature does not
survive that) and delegates to the `_kserve_*` methods here; they use the router's config, prompt format,
limits, tokenizer pool, scoring path and error handling.
"""

from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from deployments.kserve_api import (
    HEADER_LENGTH,
    MODEL_VERSION,
    SERVED_MODEL_NAME,
    InferRequest,
    check_model_version,
    encode_infer_response,
    model_config,
    model_metadata,
    parse_infer_request,
    server_metadata,
    token_lists,
)
from deployments.limits import check_prompts
from deployments.prompt import TokenizedPrompt
from deployments.router_affinity import rendered_affinity_key

SERVICE_VERSION = "0.1.0"


class KServeRoutes:
    async def _kserve_infer(self, model_name: str, http_request: Request, model_version: str | None = None) -> Response:
        try:
            self._check_kserve_model(model_name, model_version)
            request = await self._in_pool(
                parse_infer_request,
                await http_request.body(),
                http_request.headers.get(HEADER_LENGTH),
                http_request.headers.get("content-encoding"),
                self._limits.max_request_bytes,
            )
            body, headers = await self._at_home("kserve_infer", (model_name, request), self._kserve_key(request))
            return Response(content=body, headers=headers)
        except Exception as exc:
            return self._http_error(exc, http_request)

    async def _kserve_infer_work(self, payload: tuple[str, InferRequest]) -> tuple[bytes, dict[str, str]]:
        model_name, request = payload
        prompts = await self._in_pool(self._kserve_prompts, request)
        self._metrics.truncated("/v2/models/{model_name}/infer", sum(p.truncated for p in prompts))
        attributes = (await self._score_tokens([prompt.token_ids for prompt in prompts], "inputs")).attributes
        exceeded = np.array([[int(prompt.truncated)] for prompt in prompts], dtype=np.int32)
        return encode_infer_response(model_name, request, {"rewards": attributes, "exceeded": exceeded})

    def _kserve_key(self, request: InferRequest) -> str | None:
        """The prefix-affinity key of the first `sentences` row (rendered text); `tokens` rows have none."""
        sentences = request.tensors.get("sentences")
        if sentences is None or not len(sentences):
            return None
        first = sentences.reshape(-1)[0]
        text = first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
        return rendered_affinity_key(text, self._prompt.assistant_header)

    def _kserve_prompts(self, request: InferRequest) -> list[TokenizedPrompt]:
        """Over-long inputs are cut as `truncate: left` cuts a conversation and flagged `exceeded`; see README."""
        check_prompts(next(iter(request.tensors.values())).shape[0], self._limits, "inputs")
        sequences = token_lists(request, self._prompt.encode, self._prompt.vocab_size, self._prompt.eos_id)
        self._check_count(len(sequences), "inputs")
        return [self._prompt.fit_token_ids(ids, max_tokens=self._limit_tokens) for ids in sequences]

    def _check_kserve_model(self, model_name: str, model_version: str | None) -> None:
        self._check_model(model_name, accepted=(SERVED_MODEL_NAME, self._cfg.model_name), param="model_name")
        check_model_version(model_version)

    async def _kserve_server_metadata(self) -> dict[str, Any]:
        return server_metadata(SERVICE_VERSION)

    async def _kserve_live(self) -> dict[str, bool]:
        return {"live": True}

    async def _kserve_ready(self) -> dict[str, bool]:
        return await self._ready_or_503({"ready": True})

    async def _kserve_model_metadata(self, model_name: str, model_version: str | None = None) -> dict[str, Any]:
        self._check_kserve_model(model_name, model_version)  # errors: the ServiceError handler, KServe shape
        return model_metadata(model_name, len(self._cfg.scoring.attribute_names), self._cfg.device_label)

    async def _kserve_model_ready(self, model_name: str, model_version: str | None = None) -> dict[str, Any]:
        self._check_kserve_model(model_name, model_version)
        return await self._ready_or_503({"name": model_name, "ready": True})

    async def _kserve_model_config(self, model_name: str, model_version: str | None = None) -> dict[str, Any]:
        """Triton's JSON model configuration (what PyTriton's clients read before inferring)."""
        self._check_kserve_model(model_name, model_version)
        return model_config(model_name, len(self._cfg.scoring.attribute_names),
                            self._cfg.router.max_conversations_per_request)

    async def _kserve_repository_index(self) -> list[dict[str, str]]:
        """Triton's model repository index (PyTriton's asyncio client polls it for the model's state)."""
        return [{"name": name, "version": MODEL_VERSION, "state": "READY"}
                for name in dict.fromkeys((SERVED_MODEL_NAME, self._cfg.model_name))]
