"""OpenRLHF's remote reward model protocol (`--remote_rm_url http://host:8000/get_reward`).

OpenRLHF's `remote_rm_fn` POSTs `{"query": [...], "prompts": [...], "labels": [...]}` and reads `rewards`
(newer versions also `scores` and `extra_logs`). Each `query` is a prompt and response already rendered
with the reward model's template, like KServe `sentences`: it is tokenized as it is, `<extra_id_2>` is
appended when missing (SteerLM template), and an over-long query is fitted as `sentences` are (see
`deployments.rendered_prompts`). `prompts` and `labels` are accepted and not used: this scorer needs only
the rendered conversation.

The answer: `rewards` = `scores` = the weighted scalar per query (the service's weights, as `/v1/score`),
and `extra_logs` with one list per attribute (raw head outputs), which OpenRLHF logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from deployments.schemas import StrictBody, Text


class GetRewardRequest(StrictBody):
    query: list[Text] = Field(
        min_length=1,
        description="Rendered prompts (conversation + response in the model's template), one per sample; "
        "`<extra_id_2>` is appended when missing.",
    )
    prompts: list[Any] | None = Field(default=None, description="OpenRLHF's prompts; accepted and not used.")
    labels: list[Any] | None = Field(default=None, description="OpenRLHF's labels; accepted and not used.")


class GetRewardResponse(StrictBody):
    rewards: list[float] = Field(description="dot(weights, attributes) per query, in request order.")
    scores: list[float] = Field(description="The same values as `rewards` (newer OpenRLHF versions read it).")
    extra_logs: dict[str, list[float]] = Field(description="Per attribute name, its raw value per query.")


def get_reward_body(scored: Sequence[Mapping[str, Any]], attribute_names: Sequence[str]) -> GetRewardResponse:
    """`scored`: the scoring deployment's `{"score", "attributes"}` per query."""
    rewards = [item["score"] for item in scored]
    extra_logs = {name: [item["attributes"][name] for item in scored] for name in attribute_names}
    return GetRewardResponse(rewards=rewards, scores=list(rewards), extra_logs=extra_logs)
