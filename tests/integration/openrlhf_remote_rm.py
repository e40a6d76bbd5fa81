"""OpenRLHF's remote reward model client, re-implemented from `openrlhf/utils/remote_rm_utils.py`
(OpenRLHF, Apache License 2.0) for the tests: `remote_rm_fn(api_url, queries, ...)` POSTs
`{"query": queries, "prompts": ..., "labels": ...}` as JSON with `requests` (timeout 180 s, up to 5
tries), asserts the score key (`rewards`) is in the answer and returns it as a tensor (a float64 array
here: the tests do not need torch)."""

from __future__ import annotations

import time

import numpy as np
import requests


def request_api_wrapper(url: str, data: dict, score_key: str = "rewards", try_max_times: int = 5):
    for _ in range(try_max_times):
        try:
            response = requests.post(url=url, json=data, headers={"Content-Type": "application/json"}, timeout=180)
            response.raise_for_status()
            body = response.json()
            assert score_key in body, f"{score_key} not in {body}"
            return body.get(score_key)
        except requests.HTTPError:
            raise  # the service's 4xx are final; OpenRLHF logs and retries, which changes nothing here
        except requests.RequestException:
            time.sleep(1)
    raise RuntimeError(f"request failed {try_max_times} times")


def remote_rm_fn(api_url: str, queries: list[str], prompts=None, labels=None, score_key: str = "rewards") -> np.ndarray:
    data = {"query": queries}
    if prompts is not None:
        data["prompts"] = prompts
    if labels is not None:
        data["labels"] = labels
    return np.asarray(request_api_wrapper(api_url, data, score_key), dtype=np.float64)
