"""Score conversations from another Ray job through a Serve DeploymentHandle (no HTTP).

    python examples/score_with_handle.py --address auto          # a cluster started by `serve run` / `ray start`

The handle method takes the same body as `POST /v1/score` and raises the same typed errors
(`deployments.errors`), so callers can catch them by type.
"""

from __future__ import annotations

import argparse
import json

import ray
from ray import serve

from deployments.errors import InputTooLongError, InvalidRequestError

REQUEST = {
    "conversations": [
        {"messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]},
        {"messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7"},
        ]},
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="auto", help="Ray cluster address.")
    parser.add_argument("--app", default="reward", help="Serve application name.")
    args = parser.parse_args()

    ray.init(address=args.address, log_to_driver=False)
    handle = serve.get_app_handle(args.app)
    response = handle.score.remote(REQUEST).result()
    print(json.dumps({"ok": response}))

    too_long = {"conversations": [{"messages": [
        {"role": "user", "content": "Repeat after me. " * 3000},
        {"role": "assistant", "content": "No."},
    ]}]}
    try:
        handle.score.remote(too_long).result()
    except InputTooLongError as e:  # a subclass of InvalidRequestError: catch either
        print(json.dumps({"too_long": {"tokens": e.num_tokens, "limit": e.limit_tokens, "message": e.message}}))
    try:
        handle.score.remote({"conversations": [{"messages": [{"role": "user", "content": "hi"}]}]}).result()
    except InvalidRequestError as e:
        print(json.dumps({"invalid": {"param": e.param, "message": e.message}}))


if __name__ == "__main__":
    main()
