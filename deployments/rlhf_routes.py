"""The RLHF frameworks' reward-model protocols on the router: OpenRLHF's remote reward model
(`POST /get_reward`, `deployments.openrlhf_api`) and vLLM's pooling endpoints for reward models
(`POST /classify`, `POST /pooling`, `deployments.vllm_api`, what veRL's remote reward client calls). Each
route is validate -> render/tokenize -> the router's scoring path -> the protocol's response.

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
from deployments.vllm_api import ClassifyRequest, PoolingRequest, classify_body, pooling_body


class RLHFRoutes:
    async def _get_reward(self, body: GetRewardRequest, http_request: Request) -> Any:
        """OpenRLHF's `--remote_rm_url`: rendered queries -> weighted rewards and per-attribute logs."""
        try:
            prompts = await self._in_pool(self._rendered_prompts, body.query, "query", True)
            scored = await self._score_prompts(prompts, "/get_reward")
            return get_reward_body(scored, self._cfg.scoring.attribute_names)
        except Exception as exc:
            return self._http_error(exc, http_request)

    async def _classify(self, body: ClassifyRequest, http_request: Request) -> Any:
        """vLLM's `/classify` for reward models: `probs` = nine attributes, then the weighted reward."""
        try:
            prompts = await self._vllm_prompts(body)
            scored = await self._score_prompts(prompts, "/classify")
            return classify_body(_request_id(http_request), self._cfg.model_name, scored,
                                 self._cfg.scoring.attribute_names, sum(p.num_tokens for p in prompts))
        except Exception as exc:
            return self._http_error(exc, http_request)

    async def _pooling(self, body: PoolingRequest, http_request: Request) -> Any:
        """vLLM's `/pooling` for reward models: `data` = nine attributes, then the weighted reward."""
        try:
            prompts = await self._vllm_prompts(body)
            scored = await self._score_prompts(prompts, "/pooling")
            return pooling_body(_request_id(http_request), self._cfg.model_name, scored,
                                self._cfg.scoring.attribute_names, sum(p.num_tokens for p in prompts))
        except Exception as exc:
            return self._http_error(exc, http_request)

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
