"""The `/v1/score` work of the router (and its handle's `score`): validate the body (its `timeout_s` taken out
first), render and tokenize (a best-of-N prompt once for all its responses), score through the router's one
scoring path, answer with results and `usage`. A mixin of `deployments.router.Router`, which declares the
route and the handle methods. No torch here.
"""

import time
from typing import Any

from deployments.admission import TIMEOUT_FIELD, RequestScope, current_scope, parse_timeout
from deployments.limits import check_raw_score_request, check_score_request, parse_json
from deployments.prompt import TokenizedPrompt
from deployments.schemas import ScoreRequest, ScoreResponse, ScoreResult, TurnResult, Usage
from deployments.scoring import check_request_weights


class ScoreRoutes:
    def _validate(self, body: ScoreRequest | dict[str, Any] | bytes) -> ScoreRequest:
        return self._validate_timed(body)[0]

    def _validate_timed(self, body: ScoreRequest | dict[str, Any] | bytes) -> tuple[ScoreRequest, float | None]:
        """A request body (bytes over HTTP, a dict or a ScoreRequest from a handle) checked against the limits
        (counts on the raw JSON first, before it becomes models) and validated; with its `timeout_s`."""
        timeout_s = None
        if isinstance(body, ScoreRequest):
            request = body
        else:
            raw = parse_json(body) if isinstance(body, bytes) else body
            if isinstance(raw, dict) and TIMEOUT_FIELD in raw:
                raw = dict(raw)
                timeout_s = parse_timeout(raw.pop(TIMEOUT_FIELD), TIMEOUT_FIELD, self._limits.max_timeout_s)
            check_raw_score_request(raw, self._limits)
            request = ScoreRequest.model_validate(raw)
        check_score_request(request, self._limits)
        check_request_weights(request.weights, self._cfg.scoring.attribute_names)
        return request, timeout_s

    async def _validated_in_scope(self, body: ScoreRequest | dict[str, Any] | bytes) -> ScoreRequest:
        """`_validate_timed` on the pool; the body's `timeout_s` shortens the request's deadline."""
        request, timeout_s = await self._in_pool(self._validate_timed, body)
        scope = current_scope.get()
        if timeout_s is not None:
            current_scope.set((scope or RequestScope(arrived_s=time.perf_counter())).with_timeout(timeout_s))
        return request

    def _tokenize(self, request: ScoreRequest) -> list[list[tuple[int, TokenizedPrompt]]]:
        """Per conversation, its `(message index, prompt)` list: the last message only, or every assistant
        turn's prefix with `turns: "all"`."""
        out = []
        if request.best_of_n and request.turns == "last":  # the prompt is encoded once for all responses
            last = len(request.prompt)
            return [[(last, prompt)] for prompt in self._prompt.tokenize_best_of_n(
                request.prompt, request.responses, max_tokens=self._limit_tokens, truncate=request.truncate)]
        for index, conversation in enumerate(request.scored_conversations):
            kwargs = dict(max_tokens=self._limit_tokens, truncate=request.truncate, conversation_index=index)
            if request.turns == "all":
                out.append(self._prompt.tokenize_turns(conversation.messages, **kwargs))
            else:
                last = len(conversation.messages) - 1
                field = f"responses[{index}]" if request.best_of_n else None
                out.append([(last, self._prompt.tokenize_conversation(conversation.messages, field=field, **kwargs))])
        return out

    async def _score_validated(self, request: ScoreRequest) -> ScoreResponse:
        per_conversation = await self._in_pool(self._tokenize, request)
        prompts = [prompt for turns in per_conversation for _, prompt in turns]
        self._metrics.truncated("/v1/score", sum(prompt.truncated for prompt in prompts))
        model_scores = await self._score_tokens([prompt.token_ids for prompt in prompts], weights=request.weights)
        scored = iter(self._scored_rows(model_scores, request.weights))
        results = []
        for index, turns in enumerate(per_conversation):
            turn_results = [
                TurnResult(message_index=message_index, num_tokens=prompt.num_tokens, truncated=prompt.truncated,
                           **next(scored))
                for message_index, prompt in turns
            ]
            last = turn_results[-1].model_dump(exclude={"message_index"})
            results.append(ScoreResult(index=index, turns=turn_results if request.turns == "all" else None, **last))
        # computed_tokens: what the batches it rode in computed for it (deployments.batcher.RequestUsage).
        cost = model_scores.usage
        usage = Usage(prompt_tokens=sum(prompt.num_tokens for prompt in prompts), computed_tokens=cost.computed_tokens,
                      queue_ms=cost.queue_ms, compute_ms=cost.compute_ms, batch_tokens=cost.batch_tokens,
                      model_replicas=cost.replicas)
        return ScoreResponse(model=self._cfg.model_name, device=self._cfg.device_label, results=results, usage=usage)
