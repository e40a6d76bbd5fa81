"""SteerLM attribute annotation, as NeMo-Aligner's annotator (`attribute_annotate.py`) does it, at scale.

Input and output: one JSON object a line,
`{"conversations": [{"value", "from": "User"|"Assistant", "label": str|null}, ...], "mask": "User", ...}`.
Turns whose `from` equals `mask` are the user's, all others the assistant's. Every assistant turn with a
non-null label is scored on its own prefix (the conversation up to and including that turn, under the
default system prompt, then `<extra_id_2>`; the reference annotator ignores any `system` key, and so does
this) and its label becomes `quality:Q,toxicity:T,...` over all the head's attributes. Values are the
raw floats by default; `--round` clamps to [0, 4] and rounds with Python's `round` (half to even), the
reference's rule for SteerLM training data. Every other key is kept.

Output is written in input order, one line per input line that was labelled (or had nothing to label).
A malformed line (bad JSON, missing fields, a label on a user turn, an empty turn) and a line the service
rejects (e.g. over the token limit) are reported on stderr with their line number, skipped and counted.

Resuming: a restarted run first drops a partial last output line (a kill mid-write), then matches the
output's lines, in order, against the input's (labels compared only as present or null); the input
lines up to the last match are done, and the run goes on after it. Output that does not match the input
stops the job rather than mixing two files.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from deployments.errors import InvalidRequestError
from deployments.schemas import attribute_string
from jobs.client import ScoringClient
from jobs.pipeline import check_sendable, ordered_map, read_lines

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
    lineno: int
    line: SteerLMLine | MalformedLine


def groups(numbered_lines: Iterable[tuple[int, str]], max_prompts: int) -> Iterator[list[ParsedLine]]:
    """Consecutive lines parsed and grouped so that a group has at most `max_prompts` labelled turns (a line
    with more is a group of its own): one request per group amortizes the per-request cost."""
    group: list[ParsedLine] = []
    prompts = 0
    for lineno, text in numbered_lines:
        try:
            parsed = ParsedLine(lineno, parse_line(text))
        except MalformedLine as exc:
            parsed = ParsedLine(lineno, exc)
        size = len(parsed.line.conversations) if isinstance(parsed.line, SteerLMLine) else 0
        if group and prompts + size > max_prompts:
            yield group
            group, prompts = [], 0
        group.append(parsed)
        prompts += size
    if group:
        yield group


def parse_line(text: str) -> SteerLMLine:
    """The SteerLM object of one line and the prefixes to score; raises MalformedLine."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedLine(f"not valid JSON: {exc}") from None
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


def line_key(obj: Any) -> str:
    """What identifies a line across input and output: everything but the label texts."""
    if isinstance(obj, dict) and isinstance(obj.get("conversations"), list):
        turns = [{**t, "label": t.get("label") is not None} if isinstance(t, dict) else t for t in obj["conversations"]]
        obj = {**obj, "conversations": turns}
    return json.dumps(obj, sort_keys=True)


def read_done_keys(output: Path) -> tuple[list[str], bool]:
    """Keys of the output's complete lines; drops a partial last line (returns True when it did)."""
    if not output.exists():
        return [], False
    data = output.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with output.open("r+b") as f:
            f.truncate(cut)
    return [line_key(json.loads(line)) for line in data[:cut].decode("utf-8").splitlines()], cut < len(data)


def resume_point(input_path: Path, done_keys: list[str]) -> tuple[int, int]:
    """(input line count, number of the input line after which to resume); raises ValueError when the
    output's lines are not the input's in order."""
    matched, resume_after, count = 0, 0, 0
    for count, text in enumerate(read_lines(input_path), start=1):
        if matched < len(done_keys):
            try:
                key = line_key(json.loads(text))
            except json.JSONDecodeError:
                continue
            if key == done_keys[matched]:
                matched += 1
                resume_after = count
    if matched < len(done_keys):
        raise ValueError(
            f"output line {matched + 1} does not come from the input in order; the output was written from "
            "another input or edited: move it away to start over"
        )
    return count, resume_after


async def annotate(
    input_path: Path,
    output_path: Path,
    client: ScoringClient,
    *,
    round_labels: bool = False,
    concurrency: int = 16,
    truncate: str = "none",
    max_prompts_per_request: int = 32,
    progress: bool = True,
    log: TextIO = sys.stderr,
) -> AnnotateSummary:
    summary = AnnotateSummary()
    done_keys, dropped_partial = read_done_keys(output_path)
    summary.lines, resume_after = resume_point(input_path, done_keys)
    summary.already_done = len(done_keys)
    summary.skipped_earlier = resume_after - len(done_keys)  # malformed or rejected lines before the resume point
    bar = tqdm(total=summary.lines - resume_after, unit="line", file=log, disable=not progress, dynamic_ncols=True)

    def report(message: str) -> None:
        summary.problems.append(message)
        bar.write(message, file=log)

    if dropped_partial:
        report(f"{output_path}: dropped a partial last line left by an interrupted run")
    if resume_after:
        report(f"resuming after input line {resume_after} ({len(done_keys)} lines already in {output_path})")

    async def scored(conversations: list[dict[str, Any]]) -> list[dict[str, float]]:
        attributes = []
        for start in range(0, len(conversations), max_prompts_per_request):
            body = {"conversations": conversations[start:start + max_prompts_per_request], "truncate": truncate}
            attributes += [r["attributes"] for r in (await client.score(body))["results"]]
        return attributes

    async def label(group: list[ParsedLine]) -> list[tuple[int, str | None, str | None]]:
        """Labels a group of consecutive lines with one request; when the service refuses it, line by line,
        so that only the refused line is skipped."""
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
                outcomes.append((p.lineno, None, f"malformed: {p.line}"))
            elif refusal is not None:
                outcomes.append((p.lineno, None, refusal))
            else:
                for index in p.line.labelled:
                    p.line.obj["conversations"][index]["label"] = label_string(next(attributes), round_labels)
                summary.turns_scored += len(p.line.labelled)
                outcomes.append((p.lineno, json.dumps(p.line.obj) + "\n", None))
        return outcomes

    todo = ((n, t) for n, t in enumerate(read_lines(input_path), start=1) if n > resume_after)
    with output_path.open("a", encoding="utf-8") as out, bar:
        async for outcomes in ordered_map(groups(todo, max_prompts_per_request), label, concurrency):
            for lineno, text, problem in outcomes:
                if text is not None:
                    out.write(text)
                    out.flush()
                    summary.written += 1
                else:
                    kind = "malformed" if problem.startswith("malformed") else "rejected"
                    setattr(summary, kind, getattr(summary, kind) + 1)
                    report(f"{input_path}:{lineno}: {problem}; skipped")
                bar.update(1)
            retries = getattr(client, "retries", 0)
            if retries != summary.retries:  # the bar shows the retries as they happen
                summary.retries = retries
                bar.set_postfix(retries=retries, refresh=False)
    summary.retries = getattr(client, "retries", 0)
    return summary
