r"""Batch jobs against the scoring service.

    python -m jobs score --input data/ --output scored/ --url http://127.0.0.1:8000 \
        --prompt-column prompt --response-column chosen --response-column rejected --min-margin 0.5
    python -m jobs score --input s3://bucket/helpsteer2/ --output s3://bucket/scored/ --address auto \
        --prompt-column prompt --response-column response                              # on Ray Data
    python -m jobs annotate --input in.jsonl --output out.jsonl --url http://127.0.0.1:8000 [--round]
    python -m jobs annotate --input s3://bucket/steerlm/ --output s3://bucket/labelled/ --address auto  # Ray Data
    python -m jobs evaluate --input rewardbench.parquet --output metrics.json --url http://127.0.0.1:8000

Every job reads JSONL or Parquet: a file or a directory of shards, a local path or a pyarrow filesystem URI
(`jobs/tables.py`). `score` writes a directory of shards plus errors.jsonl (`jobs/score.py`,
`jobs/rows.py`); with `--address` it runs on Ray Data (`jobs/ray_data.py`). `annotate` writes what its
`--output` names: a local *.jsonl file (resumed by line), a *.parquet file (written whole at the end), or
else a directory of shards as `score` writes them (resumed by `--id-column`) (`jobs/annotate_output.py`).
`evaluate` writes its metrics as one JSON file. For annotate and evaluate, with `--url` the jobs speak HTTP
(`POST /v1/score`; the API key, if the service wants one, from the environment variable named by
`--api-key-env`); with `--address` they join the Ray cluster and call the Serve app's handle from this
process, except annotate into a directory, which runs on Ray Data as score does (`jobs/annotate_ray.py`).
See `jobs/annotate.py` and `jobs/evaluate.py` for the formats and rules.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from deployments.errors import ServiceError
from jobs.annotate import annotate
from jobs.annotate_output import output_kind
from jobs.client import DEFAULT_MAX_RETRY_S, FIRST_BACKOFF_S, make_client
from jobs.evaluate import evaluate, format_report
from jobs.rows import ColumnSpec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    annotate_cmd = commands.add_parser("annotate", help="label SteerLM rows (JSONL / Parquet) with the reward "
                                       "attributes")
    annotate_cmd.add_argument("--round", action="store_true",
                              help="clamp labels to [0, 4] and round them (SteerLM training); default: raw floats")
    annotate_cmd.add_argument("--max-prompts-per-request", type=int, default=32,
                              help="labelled turns sent in one request (the service's per-request limit caps it)")
    _annotate_output_arguments(annotate_cmd)
    evaluate_cmd = commands.add_parser("evaluate", help="RewardBench-style accuracy on chosen/rejected rows "
                                       "(JSONL / Parquet)")
    evaluate_cmd.add_argument("--rows-per-request", type=int, default=16, help="rows (2 conversations each) a request")
    evaluate_cmd.add_argument("--output", type=Path, required=True, help="the metrics: one local JSON file")
    score_cmd = commands.add_parser("score", help="per-row rewards of a JSONL / Parquet table (Ray Data with --address)")
    _score_arguments(score_cmd)
    for cmd in (annotate_cmd, evaluate_cmd, score_cmd):
        cmd.add_argument("--input", required=True, help=INPUT_HELP)
        target = cmd.add_mutually_exclusive_group(required=True)
        target.add_argument("--url", help="the service's base URL, e.g. http://127.0.0.1:8000")
        target.add_argument("--address", help="Ray cluster address (e.g. auto): Serve handles (score, and annotate "
                            "into a directory: on Ray Data)")
        cmd.add_argument("--app", default="reward", help="Serve application name (with --address)")
        cmd.add_argument("--api-key-env", default="REWARD_API_KEY",
                         help="environment variable holding the API key (with --url); unset: no key sent")
        cmd.add_argument("--concurrency", type=int, default=16, help="requests in flight")
        cmd.add_argument("--truncate", choices=("none", "left"), default="none",
                         help="over-long conversations: reject (none, reported and skipped) or keep their end")
        cmd.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
        cmd.add_argument("--max-retry-s", type=float, default=DEFAULT_MAX_RETRY_S,
                         help="retry budget of a request, in seconds after its first failure (503s, refused "
                         "connections): the default rides out a 340B replica reload (~10 minutes)")
        cmd.add_argument("--retry-backoff-s", type=float, default=FIRST_BACKOFF_S,
                         help="first retry's backoff ceiling (doubling per retry, capped at 20x it; jittered)")
    return parser


INPUT_HELP = ("JSONL or Parquet: a file or a directory of shards; a local path or a pyarrow filesystem URI "
              "(s3://, gs://, ...)")


def _annotate_output_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--output", required=True, help="a local *.jsonl file (appended; a rerun resumes after the "
                     "lines written), a *.parquet file (written whole at the end; must not exist), or else a "
                     "directory (local or URI) of part-NNNNN shards + errors.jsonl, as score writes")
    cmd.add_argument("--output-format", choices=("parquet", "jsonl"),
                     help="shard format of a directory output (default parquet)")
    cmd.add_argument("--rows-per-shard", type=int, default=10_000, help="rows in one output shard (directory output)")
    cmd.add_argument("--id-column", default="id", help="directory output: the rows' id; a rerun skips the ids "
                     "already written")
    _ray_data_arguments(cmd, only=" with a directory output")


def _score_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--output", required=True, help="output directory (local or URI): part-NNNNN shards + errors.jsonl")
    cmd.add_argument("--output-format", choices=("parquet", "jsonl"), default="parquet", help="shard format")
    cmd.add_argument("--rows-per-shard", type=int, default=10_000, help="rows in one output shard")
    cmd.add_argument("--id-column", default="id", help="the rows' id: a rerun skips the ids already written")
    cmd.add_argument("--prompt-column", help="the user prompt (a string)")
    cmd.add_argument("--response-column", action="append", default=[],
                     help="the assistant response (a string, or a list of strings: one best-of-N request); "
                     "give it twice for a pair (e.g. chosen, rejected): their margin is written")
    cmd.add_argument("--messages-column", help="chat-format rows: [{role, content}, ...] ending with the assistant")
    cmd.add_argument("--min-margin", type=float,
                     help="with two response columns: keep only rows whose margin (first - second) is at least this")
    cmd.add_argument("--round", action="store_true", help="attributes clamped to [0, 4] and rounded (SteerLM "
                     "labels), scores and margins to 2 decimals")
    cmd.add_argument("--max-conversations-per-request", type=int, default=16,
                     help="conversations (rows) sent in one request (the service's per-request limit caps it)")
    _ray_data_arguments(cmd)


def _ray_data_arguments(cmd: argparse.ArgumentParser, only: str = "") -> None:
    cmd.add_argument("--consumers", type=int, default=2, help=f"--address{only}: Ray Data scorer actors")
    cmd.add_argument("--batch-rows", type=int, default=128, help=f"--address{only}: rows per Ray Data batch")
    cmd.add_argument("--in-flight", type=int, default=16,
                     help=f"--address{only}: requests in flight per scorer actor")


async def _score(args: argparse.Namespace) -> int:
    from jobs.client import HttpScoringClient
    from jobs.score import score_http

    spec = ColumnSpec(id_column=args.id_column, prompt_column=args.prompt_column,
                      response_columns=tuple(args.response_column), messages_column=args.messages_column,
                      min_margin=args.min_margin, round_values=args.round, truncate=args.truncate)
    common = dict(output_format=args.output_format, rows_per_shard=args.rows_per_shard,
                  max_conversations=args.max_conversations_per_request, progress=not args.no_progress)
    if args.address is not None:
        from jobs.ray_data import score_ray

        summary = score_ray(args.input, args.output, spec, address=args.address, app_name=args.app,
                            consumers=args.consumers, batch_rows=args.batch_rows, in_flight=args.in_flight,
                            max_retry_s=args.max_retry_s, **common)
    else:
        client = HttpScoringClient(args.url, api_key=os.environ.get(args.api_key_env),
                                   max_connections=args.concurrency, max_retry_s=args.max_retry_s,
                                   first_backoff_s=args.retry_backoff_s)
        try:
            summary = await score_http(args.input, args.output, client, spec, concurrency=args.concurrency, **common)
        finally:
            await client.aclose()
    print(summary.text(), file=sys.stderr)
    return 0


async def _run(args: argparse.Namespace) -> int:
    if args.command == "score":
        return await _score(args)
    if args.command == "annotate" and args.address is not None and output_kind(args.output) == "directory":
        from jobs.annotate_ray import annotate_ray

        summary = annotate_ray(
            args.input, args.output, address=args.address, app_name=args.app, output_format=args.output_format,
            id_column=args.id_column, rows_per_shard=args.rows_per_shard, consumers=args.consumers,
            batch_rows=args.batch_rows, in_flight=args.in_flight, max_retry_s=args.max_retry_s,
            round_labels=args.round, truncate=args.truncate, max_prompts=args.max_prompts_per_request,
            progress=not args.no_progress, log=sys.stderr)
        print(summary.text(), file=sys.stderr)
        return 0
    client = make_client(args.url, args.address, app_name=args.app, api_key=os.environ.get(args.api_key_env),
                         concurrency=args.concurrency, max_retry_s=args.max_retry_s)
    client.first_backoff_s = args.retry_backoff_s
    try:
        if args.command == "annotate":
            summary = await annotate(
                args.input, args.output, client, round_labels=args.round, concurrency=args.concurrency,
                truncate=args.truncate, max_prompts_per_request=args.max_prompts_per_request,
                progress=not args.no_progress, output_format=args.output_format, id_column=args.id_column,
                rows_per_shard=args.rows_per_shard, log=sys.stderr,
            )
            print(summary.text(), file=sys.stderr)
        else:
            report = await evaluate(args.input, client, concurrency=args.concurrency,
                                    rows_per_request=args.rows_per_request, truncate=args.truncate,
                                    progress=not args.no_progress, log=sys.stderr)
            args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(format_report(report))
            rows = report["rows"]
            print(f"evaluate: {rows['scored']} rows scored, {rows['malformed']} malformed, "
                  f"{rows['rejected']} rejected by the service; written to {args.output}", file=sys.stderr)
    finally:
        await client.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except (ValueError, OSError) as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:  # not retryable, or still failing after the retries: stop, resumable
        print(f"{args.command}: the service failed: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
