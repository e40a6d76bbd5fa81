"""Which queued prompts form the next model batch: deficit round robin (DRR) on computed tokens. Pure Python
and numpy (no asyncio, no Ray, no torch): `deployments.batcher` owns the queue's timing, this module only
picks.

Costs are the tokens the engine computes, not the tokens requested: a batch's prompts are merged into prefix
tries (`sharding.forest`), so a prompt costs its tokens after the longest prefix it shares with a prompt
already in the batch. The budget `max_tokens_per_batch` bounds that count.

* A request's prompts (a `Job`) are kept in forest order: sorted, each with its common prefix with the
  previous one (`forest_order`). Taken in that order, prompt i costs `len - lcp[i]` after prompt i - 1 of
  the same batch, and a job over the budget is cut between two sorted prompts: its shared prefix is computed
  once per batch it spans, the fewest times a cut allows.
* Requests whose first prompts start with the same `FAMILY_PREFIX_TOKENS` tokens (one GRPO group sent as
  separate per-response requests) form one *flow* and are taken one after the other, so the batch computes
  their prompt once; every other request is a flow of its own. A job's first prompt costs its tokens after
  the common prefix with the flow's last prompt taken into the same batch.
* Flows are served by DRR: each round gives every backlogged flow `quantum` tokens of credit (the quantum of
  a tenant's flows is split among them when several tenants, API keys, wait, so that each tenant gets the
  same share), and a flow sends while its
  next packet costs no more than its credit. A flow that fits in one batch is one packet (it is not cut unless
  a batch would otherwise stay less than three quarters full); a larger flow sends prompt by prompt. Rounds
  are fast-forwarded (no empty rounds are looped through), and the flow served least recently goes first,
  so a small request behind a maximal one rides in the next batch that is formed.
* A *long* flow, led by a request over the budget, adds at most `long_flow_tokens` (the router's
  `long_request_tokens_per_batch`) to one batch, except while its next prompt continues a prefix shared with
  its last one in the batch (a cut there would compute that prefix once more). Batches then stay short while
  it is the only work, so a request arriving behind it finds less work in flight ahead of it (the role of
  vLLM's long_prefill_token_threshold in chunked prefill); several long flows still fill a batch together.

The batcher's `RequestUsage.computed_tokens` adds, per batch the job rode in, the unique tokens of its own
prompts in that batch: the tokens the engine computed for it (a prefix shared with another request's prompt
in the same batch is counted for both, as each would have computed it alone).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FAMILY_PREFIX_TOKENS = 256  # requests whose first prompts share this many leading tokens are one flow
QUANTUM_SHARE = 4  # DRR quantum: the batch budget over this
FILL_SHARE = 4  # a fitting flow is cut only to fill a batch that is emptier than budget / FILL_SHARE


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int64 token arrays."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


def forest_order(seqs: Sequence[np.ndarray]) -> tuple[list[int], list[int]]:
    """The sequences in an order where every shared prefix is contiguous (lexicographic on big-endian bytes,
    which sorts by token prefix), and each one's common prefix with its predecessor (0 first). The sum of
    lengths minus the sum of those prefixes is the unique token count of the sequences' tries."""
    keys = [s.astype(">i8").tobytes() for s in seqs]
    order = sorted(range(len(seqs)), key=keys.__getitem__)
    lcp = [0] + [common_prefix(seqs[order[j - 1]], seqs[order[j]]) for j in range(1, len(order))]
    return order, lcp


def unique_token_count(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens of the prefix tries of `token_lists` (each shared prefix once)."""
    seqs = [np.asarray(t, dtype=np.int64) for t in token_lists]
    _, lcp = forest_order(seqs)
    return sum(len(s) for s in seqs) - sum(lcp)


@dataclass(eq=False)
class Job:
    """One request's prompts, in forest order; `payload` is the batcher's (the request's future and rows)."""

    seqs: list[np.ndarray]
    order: list[int]
    lcp: list[int]
    tenant: Hashable = None
    payload: Any = None
    next: int = 0  # position in `order` of the next prompt to send
    queued_cost: int = 0  # the batcher's account of this job's queued tokens
    flow: Flow | None = None

    @classmethod
    def of(cls, token_lists: Sequence[Sequence[int]], tenant: Hashable = None, payload: Any = None) -> Job:
        seqs = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
        if not seqs or min(len(s) for s in seqs) < 1:
            raise ValueError("every prompt needs at least one token")
        order, lcp = forest_order(seqs)
        return cls(seqs, order, lcp, tenant, payload)

    @property
    def unique_tokens(self) -> int:
        return sum(len(s) for s in self.seqs) - sum(self.lcp)

    @property
    def done(self) -> bool:
        return self.next >= len(self.order)

    @property
    def queued_prompts(self) -> int:
        return len(self.order) - self.next

    def remaining_cost(self) -> int:
        """Unique tokens of the prompts not sent yet, the first counted whole."""
        if self.done:
            return 0
        rest = self.order[self.next:]
        return sum(len(self.seqs[i]) for i in rest) - sum(self.lcp[self.next + 1:])

    def family_key(self) -> tuple | None:
        first = self.seqs[self.order[0]]
        if len(first) <= FAMILY_PREFIX_TOKENS:
            return None
        return (self.tenant, first[:FAMILY_PREFIX_TOKENS].tobytes())


@dataclass(eq=False)
class Flow:
    key: Hashable
    tenant: Hashable
    jobs: list[Job] = field(default_factory=list)
    deficit: float = 0.0

    def cost(self) -> int:
        """Estimated unique tokens of the flow's queued prompts (jobs after the first share their common
        prefix with the job before)."""
        total, previous = 0, None
        for job in self.jobs:
            total += job.remaining_cost()
            if previous is not None and not job.done:
                total -= common_prefix(previous, job.seqs[job.order[job.next]])
            previous = job.seqs[job.order[-1]]
        return total


@dataclass
class Pick:
    """One prompt of a formed batch: its job, its index in the job's request, what it adds to the batch."""

    job: Job
    index: int
    cost: int
    position: int  # in the job's forest order


class DrrScheduler:
    def __init__(self, budget_tokens: int, long_flow_tokens: int | None = None):
        self.budget = budget_tokens
        self.long_flow_tokens = min(long_flow_tokens or budget_tokens, budget_tokens)
        self.quantum = max(1, budget_tokens // QUANTUM_SHARE)
        self._flows: OrderedDict[Hashable, Flow] = OrderedDict()  # least recently served first

    def __len__(self) -> int:
        return len(self._flows)

    @property
    def jobs(self) -> list[Job]:
        return [job for flow in self._flows.values() for job in flow.jobs]

    def queued_cost(self) -> int:
        return sum(flow.cost() for flow in self._flows.values())

    def add(self, job: Job) -> None:
        family = job.family_key()
        key = family if family is not None else ("job", id(job))
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = Flow(key, job.tenant)
        flow.jobs.append(job)
        job.flow = flow

    def remove(self, job: Job) -> int:
        """Drops the job's queued prompts; returns how many there were."""
        flow = job.flow
        if flow is None or job not in flow.jobs:
            return 0
        flow.jobs.remove(job)
        if not flow.jobs:
            self._flows.pop(flow.key, None)
        return job.queued_prompts

    # --- forming a batch ------------------------------------------------------------------------------

    def _quanta(self) -> dict[Hashable, float]:
        per_tenant: dict[Hashable, int] = {}
        for flow in self._flows.values():
            per_tenant[flow.tenant] = per_tenant.get(flow.tenant, 0) + 1
        if len(per_tenant) == 1:
            return {key: float(self.quantum) for key in self._flows}
        return {key: self.quantum / per_tenant[flow.tenant] for key, flow in self._flows.items()}

    def form_batch(self) -> list[Pick]:
        """Takes the next batch's prompts off the queue (empty when nothing is queued)."""
        batch: list[Pick] = []
        room = self.budget
        last: dict[Hashable, np.ndarray] = {}  # per flow, its last prompt taken into this batch
        spent: dict[Hashable, int] = {}  # per flow started in this batch, the tokens it added
        quanta = self._quanta()
        while self._flows and room > 0:
            progressed, wanted = False, {}
            for key in list(self._flows):
                flow = self._flows[key]
                whole = flow.cost() if key not in spent and not self._long(flow) else None
                if whole is not None and whole <= self.budget:  # one packet: all or nothing (in this batch)
                    if whole <= room and whole <= flow.deficit:
                        spent[key] = self._take(flow, batch, last, room, limit=None)
                        room -= spent[key]
                        progressed = True
                    elif whole <= room:
                        wanted[key] = whole
                    continue
                nxt = self._next_cost(flow, last)  # a long flow, cut across batches
                allowed = self._allowed(flow, last, spent, nxt)
                if nxt <= min(room, flow.deficit, allowed) or (not batch and nxt > self.budget):
                    taken = self._take(flow, batch, last, room, limit=max(flow.deficit, nxt),
                                       cap=self._cap_left(key, spent))
                    spent[key] = spent.get(key, 0) + taken
                    room -= taken
                    progressed = True
                elif nxt <= min(room, allowed):
                    wanted[key] = nxt
            if progressed:
                continue
            if not wanted:
                break
            # Fast-forward: the rounds until the first flow that fits has the credit for its next packet.
            rounds = min(math.ceil((need - self._flows[k].deficit) / quanta[k]) for k, need in wanted.items())
            for key, flow in self._flows.items():
                flow.deficit = min(flow.deficit + max(1, rounds) * quanta[key], self.budget)
        if self._flows and room * FILL_SHARE > self.budget:
            self._fill(batch, last, room, spent)
        return batch

    def _fill(self, batch: list[Pick], last: dict[Hashable, np.ndarray], room: int,
              spent: dict[Hashable, int]) -> None:
        """A batch left over a quarter empty takes a cut of the first waiting flow (credit or not; a long
        flow within its per-batch cap)."""
        for key, flow in list(self._flows.items()):
            nxt = self._next_cost(flow, last)
            long_flow = self._long(flow) or flow.cost() > self.budget
            if nxt <= room and (not long_flow or nxt <= self._allowed(flow, last, spent, nxt)):
                self._take(flow, batch, last, room, limit=room,
                           cap=self._cap_left(key, spent) if long_flow else math.inf)
                return

    def _long(self, flow: Flow) -> bool:
        """A flow led by a request over the budget (capped per batch until that request is sent)."""
        return self.long_flow_tokens < self.budget and flow.jobs[0].unique_tokens > self.budget

    def _allowed(self, flow: Flow, last: dict[Hashable, np.ndarray], spent: dict[Hashable, int], nxt: int) -> float:
        """What a long flow may still add to this batch: its cap's rest, or anything while its next prompt
        continues a shared prefix of its last one in the batch (a cut there would recompute that prefix)."""
        if self._continues_prefix(flow, last, nxt):
            return math.inf
        return self._cap_left(flow.key, spent)

    def _cap_left(self, key: Hashable, spent: dict[Hashable, int]) -> int:
        """What is left of a long flow's per-batch cap after what it added to this batch."""
        return self.long_flow_tokens - spent.get(key, 0)

    def _continues_prefix(self, flow: Flow, last: dict[Hashable, np.ndarray], cost: int) -> bool:
        job = flow.jobs[0]
        return flow.key in last and len(job.seqs[job.order[job.next]]) - cost >= FAMILY_PREFIX_TOKENS

    def _next_cost(self, flow: Flow, last: dict[Hashable, np.ndarray]) -> int:
        job = flow.jobs[0]
        seq = job.seqs[job.order[job.next]]
        if flow.key in last:
            shared = job.lcp[job.next] if job.next and _is(last[flow.key], job.seqs[job.order[job.next - 1]]) \
                else common_prefix(last[flow.key], seq)
            return len(seq) - shared
        return len(seq)

    def _take(self, flow: Flow, batch: list[Pick], last: dict[Hashable, np.ndarray], room: int,
              limit: float | None, cap: float = math.inf) -> int:
        """Moves prompts of `flow` into `batch` while they fit `room` (and, with a limit, cost at most `limit`
        together; the first is taken even when it alone is over both); returns their cost. `cap` is the long
        flow's per-batch cap: past it, prompts are taken only while they continue a shared prefix."""
        spent = 0
        while flow.jobs:
            cost = self._next_cost(flow, last)
            if spent and (spent + cost > room or (limit is not None and spent + cost > limit)):
                break
            if spent and spent + cost > cap and not self._continues_prefix(flow, last, cost):
                break
            job = flow.jobs[0]
            index = job.order[job.next]
            batch.append(Pick(job, index, cost, job.next))
            last[flow.key] = job.seqs[index]
            job.next += 1
            spent += cost
            if job.done:
                flow.jobs.pop(0)
        flow.deficit -= spent
        self._flows.move_to_end(flow.key)
        if not flow.jobs:
            del self._flows[flow.key]
        return spent


def _is(a: np.ndarray, b: np.ndarray) -> bool:
    return a is b
