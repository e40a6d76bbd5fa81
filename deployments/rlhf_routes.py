"""The RLHF frameworks' reward-model protocols on the router: OpenRLHF's remote reward model
(`POST /get_reward`, `deployments.openrlhf_api`) and vLLM's pooling endpoints for reward models
(`POST /classify`, `POST /pooling`, `deployments.vllm_api`, what veRL's remote reward client calls). Each
route is validate -> render/tokenize -> the router's scoring path -> the protocol's response; with several
router replicas the work after validation runs at the request's home router (`deployments.affinity_routes`).

A mixin of `deployments.router.Router`, which declares the routes (a route method must be the ingress
class's own: Serve pickles the app with it) and delegates to the methods here.
"""

from collections.abc import Sequence
from typing import Any

from fastapi import Request

from deployments.http_body import request_id as _request_id
from deployments.openrlhf_api import GetRewardRequest, get_reward_body
from deployments.prompt import TokenizedPrompt
from deployments.rendered_prompts import tokenize_rendered
from deployments.router_affinity import messages_affinity_key, rendered_affinity_key
from deployments.vllm_api import ClassifyRequest, PoolingRequest, classify_body, pooling_body


class RLHFRoutes:
    async def _get_reward(self, body: GetRewardRequest, http_request: Request) -> Any:
        """OpenRLHF's `--remote_rm_url`: rendered queries -> weighted rewards and per-attribute logs."""
        try:
            key = rendered_affinity_key(body.query[0], self._prompt.assistant_header) if body.query else None
            return await self._at_home("get_reward", body, key)
        except Exception as exc:
            return self._http_error(exc, http_request)

    async def _get_reward_work(self, body: GetRewardRequest) -> dict[str, Any]:
        prompts = await self._in_pool(self._rendered_prompts, body.query, "query", True)
        scored = await self._score_prompts(prompts, "/get_reward")
        return get_reward_body(scored, self._cfg.scoring.attribute_names)

    async def _classify(self, body: ClassifyRequest, http_request: Request) -> Any:
        """vLLM's `/classify` for reward models: `probs` = nine attributes, then the weighted reward."""
        try:
            return await self._at_home("classify", (body, _request_id(http_request)), self._vllm_key(body))
        except Exception as exc:
            return self._http_error(exc, http_request)

    async def _classify_work(self, payload: tuple[ClassifyRequest, str]) -> dict[str, Any]:
        body, request_id = payload
        prompts = await self._vllm_prompts(body)
        scored = await self._score_prompts(prompts, "/classify")
        return classify_body(request_id, self._cfg.model_name, scored, self._cfg.scoring.attribute_names,
                             sum(p.num_tokens for p in prompts))

    async def _pooling(self, body: PoolingRequest, http_request: Request) -> Any:
        """vLLM's `/pooling` for reward models: `data` = nine attributes, then the weighted reward."""
        try:
            return await self._at_home("pooling", (body, _request_id(http_request)), self._vllm_key(body))
        except Exception as exc:
            return self._http_error(exc, http_request)

    async def _pooling_work(self, payload: tuple[PoolingRequest, str]) -> dict[str, Any]:
        body, request_id = payload
        prompts = await self._vllm_prompts(body)
        scored = await self._score_prompts(prompts, "/pooling")
        return pooling_body(request_id, self._cfg.model_name, scored, self._cfg.scoring.attribute_names,
                            sum(p.num_tokens for p in prompts))

    def _vllm_key(self, body: ClassifyRequest) -> str | None:
        """The prefix-affinity key of a vLLM request: its chat messages', or its first rendered input's."""
        if body.messages is not None:
            return messages_affinity_key(body.messages)
        texts = body.texts
        return rendered_affinity_key(texts[0], self._prompt.assistant_header) if texts else None

    async def _vllm_prompts(self, body: ClassifyRequest) -> list[TokenizedPrompt]:
        if body.model is not None:
            self._check_model(body.model, accepted=(self._cfg.model_name,), param="model")
        if body.messages is not None:
            return [await self._in_pool(self._prompt.tokenize_conversation, body.messages,
                                            max_tokens=self._limit_tokens, field="messages")]
        return await self._in_pool(self._rendered_prompts, body.texts, "input", False)

    def _rendered_prompts(self, texts: Sequence[str], field: str, truncate: bool) -> list[TokenizedPrompt]:
        self._check_count(len(texts), field)
        return tokenize_rendered(self._prompt, texts, max_tokens=self._limit_tokens, field=field, truncate=truncate)

    async def _score_prompts(self, prompts: Sequence[TokenizedPrompt], route: str) -> list[dict[str, Any]]:
        """Model attributes, then the scoring deployment's weights: `{"score", "attributes"}` per prompt."""
        self._metrics.truncated(route, sum(prompt.truncated for prompt in prompts))
        return self._scored_rows(await self._score_tokens([prompt.token_ids for prompt in prompts]), None,
                                 rewards=False)
