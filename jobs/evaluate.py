"""RewardBench-style evaluation: rows `{"prompt", "chosen", "rejected", "subset"}` (other columns ignored), one
JSON object a line or Parquet rows, a file or a directory of shards, a local path or any pyarrow filesystem
URI (`jobs/pipeline.py` `read_records`, over `jobs/tables.py`).

Each row's chosen and rejected responses are scored as single-turn conversations (user: prompt,
assistant: response) by the service's scalar reward (its configured weights); a row is correct when
chosen scores strictly higher (RewardBench's rule: a tie is wrong).

Reported, as RewardBench does it (allenai/reward-bench, `SUBSET_MAPPING`, `calculate_scores_per_section`):
* per subset: accuracy = correct / rows;
* per section (Chat, Chat Hard, Safety, Reasoning): the subsets' accuracies averaged with weights = their
  row counts, except that `math-prm` weighs as much as all the code subsets (`hep-*`) together
  (RewardBench upweights it from 447 to 984 = 6 x 164 rows). RewardBench uses the row counts of the full
  filtered set as fixed constants; here they are the counts in the input, which gives the same numbers on
  the full set and stays meaningful on a part of it;
* overall: the mean of the sections present (the leaderboard's score averages the four sections).
Subsets outside the mapping are reported but enter no section. Malformed rows and rows the service
rejects (e.g. over the token limit; see `--truncate`) are reported with where they are (`file:line`,
`shard:row N`) and left out.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from deployments.errors import InvalidRequestError
from jobs.client import ScoringClient
from jobs.pipeline import Record, check_sendable, ordered_map, read_records

SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
MATH_SUBSET = "math-prm"
CODE_PREFIX = "hep-"
ROW_FIELDS = ("prompt", "chosen", "rejected", "subset")


@dataclass(frozen=True)
class Row:
    where: str  # in.jsonl:12, part-0.parquet:row 3
    prompt: str
    chosen: str
    rejected: str
    subset: str

    def conversations(self) -> list[dict[str, Any]]:
        return [{"messages": [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": answer}]}
                for answer in (self.chosen, self.rejected)]


@dataclass(frozen=True)
class RowResult:
    row: Row
    chosen_score: float = 0.0
    rejected_score: float = 0.0
    problem: str | None = None  # why the service refused the row


def parse_row(record: Record) -> Row:
    """Raises ValueError saying what is wrong with the row."""
    if record.problem is not None:
        raise ValueError(record.problem)
    obj = record.obj
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    for name in ROW_FIELDS:
        if not isinstance(obj.get(name), str) or not obj[name]:
            raise ValueError(f"`{name}` must be a non-empty string")
        check_sendable(obj[name], f"`{name}`", ValueError)
    return Row(record.where, obj["prompt"], obj["chosen"], obj["rejected"], obj["subset"])


def section_weights(counts: dict[str, int]) -> dict[str, float]:
    """Row-count weights of the subsets in sections; math-prm weighs as much as the code subsets together."""
    weights = {subset: float(counts[subset]) for subsets in SECTIONS.values() for subset in subsets if subset in counts}
    code_rows = sum(n for subset, n in counts.items() if subset.startswith(CODE_PREFIX) and subset in weights)
    if MATH_SUBSET in weights and code_rows:
        weights[MATH_SUBSET] = float(code_rows)
    return weights


def accuracy_report(outcomes: Sequence[tuple[str, bool]]) -> dict[str, Any]:
    """Per-subset, per-section and overall accuracy (fractions) from (subset, correct) per row."""
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for subset, ok in outcomes:
        total[subset] += 1
        correct[subset] += int(ok)
    section_of = {subset: name for name, subsets in SECTIONS.items() for subset in subsets}
    subsets = {s: {"accuracy": correct[s] / total[s], "correct": correct[s], "rows": total[s],
                   "section": section_of.get(s)} for s in sorted(total)}
    weights = section_weights(dict(total))
    sections = {}
    for name, members in SECTIONS.items():
        present = [s for s in members if s in weights]
        if present:
            weight = sum(weights[s] for s in present)
            sections[name] = {"accuracy": sum(subsets[s]["accuracy"] * weights[s] for s in present) / weight,
                              "subsets": present, "weights": {s: weights[s] for s in present}}
    overall = sum(s["accuracy"] for s in sections.values()) / len(sections) if sections else None
    return {"subsets": subsets, "sections": sections, "overall": overall}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'subset':<28}{'rows':>6}{'accuracy':>10}"]
    for name, s in report["subsets"].items():
        lines.append(f"{name:<28}{s['rows']:>6}{100 * s['accuracy']:>9.2f}%")
    for name, s in report["sections"].items():
        lines.append(f"{'section ' + name:<34}{100 * s['accuracy']:>9.2f}%")
    if report["overall"] is not None:
        lines.append(f"{'overall (mean of sections)':<34}{100 * report['overall']:>9.2f}%")
    return "\n".join(lines)


async def evaluate(
    input_path: str | Path,
    client: ScoringClient,
    *,
    concurrency: int = 16,
    rows_per_request: int = 16,
    truncate: str = "none",
    progress: bool = True,
    log: TextIO = sys.stderr,
) -> dict[str, Any]:
    """Scores every row and returns the report, with row counts and the problems met."""
    rows, problems = [], []
    for record in read_records(str(input_path)):
        try:
            rows.append(parse_row(record))
        except ValueError as exc:
            problems.append(f"{record.where}: malformed: {exc}; skipped")
    malformed = len(problems)
    bar = tqdm(total=len(rows), unit="row", file=log, disable=not progress, dynamic_ncols=True)
    for message in problems:
        bar.write(message, file=log)

    async def score_chunk(chunk: list[Row]) -> list[RowResult]:
        try:
            response = await client.score(_body(chunk, truncate))
        except InvalidRequestError as exc:
            if len(chunk) == 1:
                return [RowResult(chunk[0], problem=exc.message)]
            return [result for row in chunk for result in await score_chunk([row])]  # find the refused row(s)
        scores = [r["score"] for r in response["results"]]
        return [RowResult(row, scores[2 * i], scores[2 * i + 1]) for i, row in enumerate(chunk)]

    chunks = [rows[i:i + rows_per_request] for i in range(0, len(rows), rows_per_request)]
    outcomes, rejected = [], 0
    with bar:
        async for results in ordered_map(chunks, score_chunk, concurrency):
            for result in results:
                if result.problem is not None:
                    rejected += 1
                    message = f"{result.row.where}: rejected by the service: {result.problem}; skipped"
                    problems.append(message)
                    bar.write(message, file=log)
                else:
                    outcomes.append((result.row.subset, result.chosen_score > result.rejected_score))
            bar.update(len(results))
    report = accuracy_report(outcomes)
    report["rows"] = {"scored": len(outcomes), "malformed": malformed, "rejected": rejected}
    report["problems"] = problems
    return report


def _body(chunk: Sequence[Row], truncate: str) -> dict[str, Any]:
    return {"conversations": [c for row in chunk for c in row.conversations()], "truncate": truncate}
