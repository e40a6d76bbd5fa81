"""Keys that configs written for earlier versions of the service still carry, each with what replaced it.

`ServiceConfig` is strict (unknown keys fail), so an old key would fail with pydantic's generic "extra inputs
are not permitted"; `check_removed_keys` runs before validation and names the replacement instead. A key
renamed or removed from `configs.service` gets a line here (its dotted path under the app's `args`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIGRATIONS: dict[str, str] = {
    "parallel.micro_batch_size": (
        "parallel.micro_batch_size was removed: set parallel.max_tokens_per_micro_batch (tokens per micro-batch; "
        "it must hold one max-length prompt, e.g. 8192 for a 4096-token context)"
    ),
    "router.batch_wait_timeout_s": (
        "router.batch_wait_timeout_s was removed: the router's batching is pull-based, with no timer (a batch "
        "leaves as soon as fewer than router.max_batches_in_flight batches are in flight); delete the key, and "
        "set router.max_batches_in_flight (batches per router replica) to bound the batches in flight"
    ),
    "router.max_concurrent_batches": (
        "router.max_concurrent_batches was renamed: set router.max_batches_in_flight (batches sent and "
        "unanswered per router replica; default pipeline_parallel_size + 1)"
    ),
}


def _lookup(data: Mapping[str, Any], path: str) -> bool:
    """Whether the dotted `path` is a key of the nested mappings `data`."""
    *parents, key = path.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, Mapping) else None
    return isinstance(node, Mapping) and key in node


def check_removed_keys(data: Any) -> Any:
    """`data` unchanged when it has no key of `MIGRATIONS`; else ValueError naming each one's replacement."""
    if not isinstance(data, Mapping):
        return data
    found = [message for path, message in MIGRATIONS.items() if _lookup(data, path)]
    if found:
        raise ValueError("; ".join(found))
    return data
