"""Batch jobs against the scoring service.

    python -m jobs annotate --input in.jsonl --output out.jsonl --url http://127.0.0.1:8000 [--round]
    python -m jobs annotate --input in.jsonl --output out.jsonl --address auto      # handles, in the cluster
    python -m jobs evaluate --input rewardbench.jsonl --output metrics.json --url http://127.0.0.1:8000

With `--url` the jobs speak HTTP (`POST /v1/score`; the API key, if the service wants one, from the
environment variable named by `--api-key-env`); with `--address` they join the Ray cluster and call the
Serve app's handle. See `jobs/annotate.py` and `jobs/evaluate.py` for the formats and rules.
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
from jobs.client import make_client
from jobs.evaluate import evaluate, format_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    annotate_cmd = commands.add_parser("annotate", help="label SteerLM jsonl with the reward attributes")
    annotate_cmd.add_argument("--round", action="store_true",
                              help="clamp labels to [0, 4] and round them (SteerLM training); default: raw floats")
    annotate_cmd.add_argument("--max-prompts-per-request", type=int, default=32,
                              help="labelled turns sent in one request (the service's per-request limit caps it)")
    evaluate_cmd = commands.add_parser("evaluate", help="RewardBench-style accuracy on chosen/rejected jsonl")
    evaluate_cmd.add_argument("--rows-per-request", type=int, default=16, help="rows (2 conversations each) a request")
    for cmd in (annotate_cmd, evaluate_cmd):
        cmd.add_argument("--input", type=Path, required=True, help="input jsonl")
        cmd.add_argument("--output", type=Path, required=True, help="output file")
        target = cmd.add_mutually_exclusive_group(required=True)
        target.add_argument("--url", help="the service's base URL, e.g. http://127.0.0.1:8000")
        target.add_argument("--address", help="Ray cluster address (e.g. auto) to score through Serve handles")
        cmd.add_argument("--app", default="reward", help="Serve application name (with --address)")
        cmd.add_argument("--api-key-env", default="REWARD_API_KEY",
                         help="environment variable holding the API key (with --url); unset: no key sent")
        cmd.add_argument("--concurrency", type=int, default=16, help="requests in flight")
        cmd.add_argument("--truncate", choices=("none", "left"), default="none",
                         help="over-long conversations: reject (none, reported and skipped) or keep their end")
        cmd.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


async def _run(args: argparse.Namespace) -> int:
    client = make_client(args.url, args.address, app_name=args.app, api_key=os.environ.get(args.api_key_env),
                         concurrency=args.concurrency)
    try:
        if args.command == "annotate":
            summary = await annotate(
                args.input, args.output, client, round_labels=args.round, concurrency=args.concurrency,
                truncate=args.truncate, max_prompts_per_request=args.max_prompts_per_request,
                progress=not args.no_progress,
            )
            print(summary.text(), file=sys.stderr)
        else:
            report = await evaluate(args.input, client, concurrency=args.concurrency,
                                    rows_per_request=args.rows_per_request, truncate=args.truncate,
                                    progress=not args.no_progress)
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
