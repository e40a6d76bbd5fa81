"""SteerLM attribute annotation, as NeMo-Aligner's annotator (`attribute_annotate.py`) does it, at scale.

Rows: `{"conversations": [{"value", "from": "User"|"Assistant", "label": str|null}, ...], "mask": "User", ...}`,
one JSON object a line, or Parquet rows with those columns (`conversations` a list of structs
{value, from, label}). The input is a file or a directory of shards, a local path or any pyarrow filesystem
URI (`jobs/pipeline.py` `read_records`, over `jobs/tables.py`); a local file not named *.parquet is read
line by line.
Turns whose `from` equals `mask` are the user's, all others the assistant's. Every assistant turn with a
non-null label is scored on its own prefix (the conversation up to and including that turn, under the
default system prompt, then `<extra_id_2>`; the reference annotator ignores any `system` key, and so does
this) and its label becomes `quality:Q,toxicity:T,...` over all the head's attributes. Values are the
raw floats by default; `--round` clamps to [0, 4] and rounds with Python's `round` (half to even), the
reference's rule for SteerLM training data. Every other key is kept.

The output's form follows its path (`jobs/annotate_output.py`):
* `*.jsonl` (or `*.json`, or an existing local file of any name): one local JSONL file, one line per input
  row that was labelled (or had nothing to label);
* `*.parquet`: one Parquet file, written whole (temporary name, then renamed) when every row is taken, the
  rows held in memory until then (for large data give a directory); an existing file is refused, and a
  run that stops early writes nothing;
* anything else: a directory of shards as `score` writes them (`part-NNNNN.parquet`, or `.jsonl` with
  `--output-format jsonl`; `--rows-per-shard`) with `errors.jsonl`, each failed row and why.
With `--address`, a directory output is written on Ray Data (`jobs/annotate_ray.py`, running `label_rows`
in its actors); a file output by this process through the Serve handle. Rows are written in input order.
A malformed row (bad JSON, missing fields, a label on a user turn, an empty turn) and a row the service
rejects (e.g. over the token limit) are reported on stderr with where they are (`file:line`,
`shard:row N`), skipped and counted.

Resuming: into a JSONL file, a restarted run first drops a partial last output line (a kill mid-write),
then matches the output's lines, in order, against the input's (labels compared only as present or null);
the input lines up to the last match are done, and the run goes on after it. Output that does not match
the input stops the job rather than mixing two files. Into a directory, as `score`: rows whose id
(`--id-column`, default `id`) is in the shards already written are skipped; a row without one fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from deployments.errors import InvalidRequestError
from deployments.schemas import attribute_string
from jobs.annotate_output import open_output
from jobs.client import ScoringClient
from jobs.pipeline import Record, check_sendable, ordered_map

LABEL_RANGE = (0.0, 4.0)


class MalformedLine(ValueError):
    """An input line that is not a SteerLM object this job can label; the message says why."""


@dataclass(frozen=True)
class SteerLMLine:
    obj: dict[str, Any]
    conversations: list[dict[str, Any]]  # /v1/score conversations: one prefix per labelled turn
    labelled: list[int]  # indices into obj["conversations"] of the labelled (assistant) turns


@dataclass
class AnnotateSummary:
    lines: int = 0
    already_done: int = 0
    written: int = 0
    malformed: int = 0
    rejected: int = 0
    skipped_earlier: int = 0
    turns_scored: int = 0
    retries: int = 0
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        return (f"annotate: {self.lines} input lines: {self.written} written ({self.turns_scored} turns scored), "
                f"{self.already_done} already in the output, {self.malformed} malformed, {self.rejected} rejected "
                f"by the service, {self.skipped_earlier} skipped by an earlier run; {self.retries} requests retried")


@dataclass(frozen=True)
class ParsedLine:
    where: str
    obj: Any  # the input row as read (None when it could not be read)
    line: SteerLMLine | MalformedLine


def groups(records: Iterable[Record], max_prompts: int) -> Iterator[list[ParsedLine]]:
    """Consecutive rows parsed and grouped so that a group has at most `max_prompts` labelled turns (a row
    with more is a group of its own): one request per group amortizes the per-request cost."""
    group: list[ParsedLine] = []
    prompts = 0
    for record in records:
        try:
            if record.problem is not None:
                raise MalformedLine(record.problem)
            parsed = ParsedLine(record.where, record.obj, parse_object(record.obj))
        except MalformedLine as exc:
            parsed = ParsedLine(record.where, record.obj, exc)
        size = len(parsed.line.conversations) if isinstance(parsed.line, SteerLMLine) else 0
        if group and prompts + size > max_prompts:
            yield group
            group, prompts = [], 0
        group.append(parsed)
        prompts += size
    if group:
        yield group


def parse_line(text: str) -> SteerLMLine:
    """The SteerLM object of one JSON line and the prefixes to score; raises MalformedLine."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedLine(f"not valid JSON: {exc}") from None
    return parse_object(obj)


def parse_object(obj: Any) -> SteerLMLine:
    """The SteerLM row (a JSON object or a Parquet row) and the prefixes to score; raises MalformedLine."""
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list) or not obj["conversations"]:
        raise MalformedLine("expected an object with a non-empty `conversations` list")
    mask = obj.get("mask", "User")
    if not isinstance(mask, str):
        raise MalformedLine("`mask` must be a string")
    messages, labelled = [], []
    for index, turn in enumerate(obj["conversations"]):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            raise MalformedLine(f"{where} must be an object with a string `from`")
        if not isinstance(turn.get("value"), str) or not turn["value"]:
            raise MalformedLine(f"{where}.value must be a non-empty string")
        check_sendable(turn["value"], f"{where}.value", MalformedLine)
        label = turn.get("label")
        if label is not None and not isinstance(label, str):
            raise MalformedLine(f"{where}.label must be a string or null")
        role = "user" if turn["from"] == mask else "assistant"
        if label is not None:
            if role == "user":
                raise MalformedLine(f"{where} is a {mask} turn with a label; only assistant turns are scored")
            labelled.append(index)
        messages.append({"role": role, "content": turn["value"]})
    conversations = [{"messages": messages[: index + 1]} for index in labelled]
    return SteerLMLine(obj=obj, conversations=conversations, labelled=labelled)


def label_string(attributes: dict[str, float], round_labels: bool) -> str:
    """The SteerLM label of one turn: every attribute, raw or clamped to [0, 4] and rounded."""
    if round_labels:
        low, high = LABEL_RANGE
        attributes = {name: round(min(high, max(low, value))) for name, value in attributes.items()}
    return attribute_string(attributes)


async def label_rows(records: Iterable[Record], client: ScoringClient, *, round_labels: bool, truncate: str,
                     max_prompts: int, concurrency: int) -> AsyncIterator[list[tuple[ParsedLine, str | None]]]:
    """Groups of consecutive rows, labelled in place, in input order, `concurrency` requests in flight;
    each row with its problem (None: labelled). Both the in-process and the Ray Data path run this."""
    async def scored(conversations: list[dict[str, Any]]) -> list[dict[str, float]]:
        attributes = []
        for start in range(0, len(conversations), max_prompts):
            body = {"conversations": conversations[start:start + max_prompts], "truncate": truncate}
            attributes += [r["attributes"] for r in (await client.score(body))["results"]]
        return attributes

    async def label(group: list[ParsedLine]) -> list[tuple[ParsedLine, str | None]]:
        """Labels a group of consecutive rows with one request; when the service refuses it, row by row,
        so that only the refused row is skipped."""
        lines = [p for p in group if isinstance(p.line, SteerLMLine)]
        try:
            attributes = iter(await scored([c for p in lines for c in p.line.conversations]))
        except InvalidRequestError as exc:
            if len(lines) > 1:
                return [outcome for p in group for outcome in await label([p])]
            attributes, refusal = iter(()), f"rejected by the service: {exc.message}"
        else:
            refusal = None
        outcomes = []
        for p in group:
            if not isinstance(p.line, SteerLMLine):
                outcomes.append((p, f"malformed: {p.line}"))
            elif refusal is not None:
                outcomes.append((p, refusal))
            else:
                for index in p.line.labelled:
                    p.line.obj["conversations"][index]["label"] = label_string(next(attributes), round_labels)
                outcomes.append((p, None))
        return outcomes

    async for outcomes in ordered_map(groups(records, max_prompts), label, concurrency):
        yield outcomes


async def annotate(
    input_path: str | Path,
    output_path: str | Path,
    client: ScoringClient,
    *,
    round_labels: bool = False,
    concurrency: int = 16,
    truncate: str = "none",
    max_prompts_per_request: int = 32,
    progress: bool = True,
    log: TextIO = sys.stderr,
    output_format: str | None = None,
    id_column: str = "id",
    rows_per_shard: int = 10_000,
) -> AnnotateSummary:
    summary = AnnotateSummary()
    output = open_output(str(output_path), output_format, id_column=id_column, rows_per_shard=rows_per_shard)
    todo, total, messages = output.start(str(input_path), summary)
    bar = tqdm(total=total, unit="line", file=log, disable=not progress, dynamic_ncols=True)

    def report(message: str) -> None:
        summary.problems.append(message)
        bar.write(message, file=log)

    for message in messages:
        report(message)

    complete = False
    try:
        with bar:
            async for outcomes in label_rows(todo, client, round_labels=round_labels, truncate=truncate,
                                             max_prompts=max_prompts_per_request, concurrency=concurrency):
                for parsed, problem in outcomes:
                    if problem is None:
                        output.write(parsed.line.obj)
                        summary.written += 1
                        summary.turns_scored += len(parsed.line.labelled)
                    else:
                        kind = "malformed" if problem.startswith("malformed") else "rejected"
                        setattr(summary, kind, getattr(summary, kind) + 1)
                        output.failed(parsed.where, parsed.obj, problem)
                        report(f"{parsed.where}: {problem}; skipped")
                    bar.update(1)
                retries = getattr(client, "retries", 0)
                if retries != summary.retries:  # the bar shows the retries as they happen
                    summary.retries = retries
                    bar.set_postfix(retries=retries, refresh=False)
        complete = True
    finally:
        output.close(complete)
    summary.retries = getattr(client, "retries", 0)
    summary.lines = (summary.already_done + summary.skipped_earlier + summary.written + summary.malformed
                     + summary.rejected)
    return summary
