"""Table rows -> `/v1/score` requests -> output rows, for `python -m jobs score` (both of its paths).

Column mapping (`ColumnSpec`):
* `--prompt-column P --response-column R`: the conversation user: row[P], assistant: row[R]. A list column of
  responses becomes one best-of-N request (`prompt` + `responses`: the prompt computed once), and the
  output has a list of scores for it. Two response columns (e.g. `chosen`, `rejected`) are each scored,
  and their `margin` (first minus second) is written; `--min-margin` keeps only pairs at or above it.
* `--messages-column M`: chat-format rows, `[{"role", "content"}, ...]` ending with the assistant turn.
* `--id-column`: the row's id, what a rerun skips by.

Output: every input column, then per response column R `R_score` and `R_attributes` (a list of each for a
list column), or `score` and `attributes` for a messages column, then `margin` with two response columns.
`--round`: attributes clamped to [0, 4] and rounded (the SteerLM label rule, as `annotate --round`), scores
and margins rounded to `ROUND_DIGITS` decimals.

Consecutive rows share a request (up to `max_conversations` conversations; a best-of-N row is a request of
its own). When the service refuses a shared request (a bad row, e.g. over the token limit), its rows are
sent one by one so that only the bad row fails, with the service's reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from deployments.errors import InvalidRequestError
from jobs.annotate import LABEL_RANGE
from jobs.client import ScoringClient
from jobs.pipeline import ordered_map
from jobs.tables import BadRow, InputRow

ROUND_DIGITS = 2


class BadInput(ValueError):
    """A row the column mapping cannot turn into a request; the message names the column."""


@dataclass(frozen=True)
class ColumnSpec:
    id_column: str = "id"
    prompt_column: str | None = None
    response_columns: tuple[str, ...] = ()
    messages_column: str | None = None
    min_margin: float | None = None
    round_values: bool = False
    truncate: str = "none"

    def __post_init__(self) -> None:
        if self.messages_column is not None and (self.prompt_column or self.response_columns):
            raise ValueError("give either --messages-column or --prompt-column with --response-column, not both")
        if self.messages_column is None and not (self.prompt_column and self.response_columns):
            raise ValueError("give --prompt-column and --response-column (or --messages-column)")
        if len(self.response_columns) > 2:
            raise ValueError("at most two --response-column (a pair: chosen, rejected)")
        if self.min_margin is not None and len(self.response_columns) != 2:
            raise ValueError("--min-margin needs two --response-column (the pair whose margin it filters)")


@dataclass(frozen=True)
class Part:
    """One thing to score for a row: a conversation, or a best-of-N prompt with its responses."""

    column: str
    messages: list[dict[str, str]] | None = None
    prompt: list[dict[str, str]] | None = None
    responses: list[str] | None = None

    @property
    def size(self) -> int:
        return len(self.responses) if self.responses is not None else 1


@dataclass(frozen=True)
class RowWork:
    where: str
    row: dict[str, Any]
    parts: list[Part]


@dataclass(frozen=True)
class Outcome:
    where: str
    row_id: Any
    row: dict[str, Any] | None = None  # the output row; None when filtered out or failed
    error: str | None = None


def _text(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value:
        raise BadInput(f"column {column!r} must be a non-empty string, got {type(value).__name__}")
    return value


def parts_of(row: dict[str, Any], spec: ColumnSpec) -> list[Part]:
    """What to score for one row; raises BadInput naming the column."""
    if spec.messages_column is not None:
        messages = row.get(spec.messages_column)
        if not isinstance(messages, list) or not messages:
            raise BadInput(f"column {spec.messages_column!r} must be a non-empty list of messages")
        out = []
        for index, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadInput(f"{spec.messages_column}[{index}] must have string `role` and `content`")
            out.append({"role": m["role"], "content": m["content"]})
        return [Part(spec.messages_column, messages=out)]
    prompt = [{"role": "user", "content": _text(row, spec.prompt_column)}]
    parts = []
    for column in spec.response_columns:
        value = row.get(column)
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) for v in value):
                raise BadInput(f"column {column!r} must be a non-empty list of strings")
            parts.append(Part(column, prompt=prompt, responses=list(value)))
        else:
            parts.append(Part(column, messages=[*prompt, {"role": "assistant", "content": _text(row, column)}]))
    return parts


def plan(rows: Iterable[InputRow | BadRow], spec: ColumnSpec, max_conversations: int
         ) -> Iterator[list[RowWork] | Outcome]:
    """Rows into groups sharing a request (or failures, passed on as outcomes)."""
    group: list[RowWork] = []
    size = 0
    for item in rows:
        if isinstance(item, BadRow):
            yield Outcome(item.where, None, error=item.reason)
            continue
        row_id = item.row.get(spec.id_column)
        try:
            if spec.id_column not in item.row:
                raise BadInput(f"no id column {spec.id_column!r} (name one with --id-column)")
            work = RowWork(item.where, item.row, parts_of(item.row, spec))
        except BadInput as exc:
            yield Outcome(item.where, row_id, error=str(exc))
            continue
        alone = any(p.responses is not None for p in work.parts)
        if group and (alone or size + len(work.parts) > max_conversations):
            yield group
            group, size = [], 0
        group.append(work)
        size += len(work.parts)
        if alone:
            yield group
            group, size = [], 0
    if group:
        yield group


def _rounded(result: dict[str, Any], spec: ColumnSpec) -> tuple[float, dict[str, float]]:
    score, attributes = result["score"], result["attributes"]
    if spec.round_values:
        low, high = LABEL_RANGE
        return round(score, ROUND_DIGITS), {k: round(min(high, max(low, v))) for k, v in attributes.items()}
    return score, attributes


def output_row(work: RowWork, results: list[list[dict[str, Any]]], spec: ColumnSpec) -> dict[str, Any] | None:
    """The input row with its scores (per part, its results in order); None when the margin filter drops it."""
    out = dict(work.row)
    scalars = []
    for part, part_results in zip(work.parts, results):
        prefix = "" if part.column == spec.messages_column else f"{part.column}_"
        pairs = [_rounded(r, spec) for r in part_results]
        if part.responses is not None:
            out[f"{prefix}score"] = [s for s, _ in pairs]
            out[f"{prefix}attributes"] = [a for _, a in pairs]
        else:
            out[f"{prefix}score"], out[f"{prefix}attributes"] = pairs[0]
            scalars.append(part_results[0]["score"])
    if len(spec.response_columns) == 2 and len(scalars) == 2:
        margin = scalars[0] - scalars[1]
        out["margin"] = round(margin, ROUND_DIGITS) if spec.round_values else margin
        if spec.min_margin is not None and margin < spec.min_margin:
            return None
    return out


def _body(parts: list[Part], truncate: str) -> dict[str, Any]:
    if len(parts) == 1 and parts[0].responses is not None:
        return {"prompt": parts[0].prompt, "responses": parts[0].responses, "truncate": truncate}
    return {"conversations": [{"messages": p.messages} for p in parts], "truncate": truncate}


async def score_group(group: list[RowWork], client: ScoringClient, spec: ColumnSpec) -> list[Outcome]:
    """One request for the group; when the service refuses it, row by row, so only the refused row fails."""
    parts = [p for w in group for p in w.parts]
    try:
        if any(p.responses is not None for p in parts) and len(parts) > 1:  # best-of-N columns: one request each
            results = [r for p in parts for r in (await client.score(_body([p], spec.truncate)))["results"]]
        else:
            results = (await client.score(_body(parts, spec.truncate)))["results"]
    except InvalidRequestError as exc:
        if len(group) > 1:
            return [o for w in group for o in await score_group([w], client, spec)]
        return [Outcome(group[0].where, group[0].row.get(spec.id_column), error=f"rejected by the service: {exc.message}")]
    outcomes = []
    position = 0
    for work in group:
        per_part = []
        for part in work.parts:
            per_part.append(results[position:position + part.size])
            position += part.size
        outcomes.append(Outcome(work.where, work.row.get(spec.id_column), row=output_row(work, per_part, spec)))
    return outcomes


async def score_rows(rows: Iterable[InputRow | BadRow], client: ScoringClient, spec: ColumnSpec, *,
                     concurrency: int, max_conversations: int) -> AsyncIterator[Outcome]:
    """Outcomes of all rows in input order, `concurrency` requests in flight."""
    async def run(item: list[RowWork] | Outcome) -> list[Outcome]:
        return [item] if isinstance(item, Outcome) else await score_group(item, client, spec)

    async for outcomes in ordered_map(plan(rows, spec, max_conversations), run, concurrency):
        for outcome in outcomes:
            yield outcome
