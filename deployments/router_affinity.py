"""Prefix affinity between router replicas: requests that share a prompt prefix are batched by one router, so
the engine computes that prefix once (token-forest batches) instead of once per router. No torch here.

RLHF frameworks send one request per sample, so the responses of a GRPO group arrive as separate requests;
spread over R routers their shared prompt would be computed up to R times. Serve's HTTP proxy picks a router
before the body is read (it forwards only the ASGI scope), so the key cannot steer that first choice. Instead,
with more than one router replica, the router that received a `/v1/score` request (or a handle `score` call)
reads it, takes its affinity key, and hands it to its *home* router through a handle to the Router deployment
itself (`Router.score_routed`), which validates and scores it there. One extra hop, only with several routers.

The key (`affinity_key`): the system text and first user turn of the first conversation, or the best-of-N
prompt; for an already rendered prompt (`/get_reward`, `/classify`, `/pooling`, KServe `sentences`), its text
before the first assistant turn (`rendered_affinity_key`). Requests without one (KServe `tokens`, a rendered
prompt without an assistant turn) go where Serve's default would send them. The other routes are handed to
their home as a whole (`deployments.affinity_routes`). Between a router and the model replicas there is no
affinity to keep: the engine caches nothing across batches, so any replica computes a batch at the same cost.
The choice (`PrefixAffinityRouter`, Serve's request-router API on the Router deployment): rendezvous hashing
of the key over the running router replicas, so a key keeps its home while replicas come and go (only the keys
of a replica that left move). The home is the only candidate unless it is IMBALANCE_REQUESTS ahead of the
least-loaded replica (by Serve's queue-length cache); then the others come first, least loaded first, as Ray's
own PrefixCacheAffinityRouter falls back under imbalance. A full home makes the request wait for it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter

ROUTER_DEPLOYMENT = "Router"  # the Router deployment's name: routers hand requests to each other through it
ROUTER_REQUEST_ROUTER = "deployments.router_affinity.PrefixAffinityRouter"  # by path: see model_routing
IMBALANCE_REQUESTS = 32  # ongoing requests the home may hold beyond the least-loaded replica before spilling
KEY_FIELD = "affinity_key"


def affinity_key(request: Any) -> str | None:
    """A validated ScoreRequest's prefix key: its best-of-N prompt, or its first conversation's messages up to
    and including the first user turn (system text included)."""
    if request.prompt is not None:
        return messages_affinity_key(request.prompt)
    if request.conversations:
        return messages_affinity_key(request.conversations[0].messages)
    return None


def messages_affinity_key(messages: Sequence[Any]) -> str:
    """The key of a conversation (validated messages): its messages up to and including the first user turn."""
    prefix = []
    for message in messages:
        prefix.append(message)
        if message.role == "user":
            break
    return _digest("\x1e".join(f"{m.role}\x1f{m.content}" for m in prefix))


def rendered_affinity_key(text: str, assistant_header: str | None) -> str | None:
    """The key of an already rendered prompt (`/get_reward`'s `query`, `/classify`'s `input`, KServe
    `sentences`): its text before the first assistant turn's header (the prompt format's: SteerLM's
    `<extra_id_1>Assistant`, a chat template's generation prompt), i.e. the system text and first user turn.
    None (Serve's default choice) when the format has no header or the text does not contain it."""
    if not assistant_header:
        return None
    end = text.find(assistant_header)
    return None if end < 0 else _digest(text[:end])


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids by descending hash of (key, id): the first is the key's home."""
    return sorted(replica_ids, key=lambda r: hashlib.blake2b(f"{key}\x00{r}".encode(), digest_size=8).digest(),
                  reverse=True)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        key = pending_request.kwargs.get(KEY_FIELD) if pending_request is not None else None
        if not key or len(candidate_replicas) <= 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ordered = [by_id[i] for i in rendezvous_order(key, list(by_id))]
        queue = self.replica_queue_len_cache
        lengths = [queue.get(r.replica_id) for r in ordered]
        known = [n for n in lengths if n is not None]
        if known and lengths[0] is not None and lengths[0] - min(known) > IMBALANCE_REQUESTS:
            return [ordered[1:], ordered[:1]]  # spill: the others (least loaded wins), the home last
        return [ordered[:1]]  # the home alone: a slow queue-length probe must not send the group elsewhere
