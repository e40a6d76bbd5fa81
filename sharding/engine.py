"""MegatronEngine: the RewardEngine that runs the model in worker actors inside a placement group.

The engine owns the batch layout (`parallel.batch_layout`, `sharding.micro_batches`): token-forest rows
(shared prefixes computed once, no padding) or length-sorted right-padded micro-batches, each within
`parallel.max_tokens_per_micro_batch` tokens. It sends the micro-batches (token ids, positions, masks'
metadata) to every rank through the object store and returns the last stage's rewards in the caller's
order.
Streaming: batches are not serialized. Each batch's forward call is submitted to every worker under a short
submission lock (no await inside, nothing computed under it), so all ranks see one global order of batches;
a worker is a synchronous single-threaded Ray actor, and Ray runs such an actor's calls from one caller in
submission order, so the collectives and point-to-point transfers of two batches never interleave. The lock
is released at once: stage 0 starts batch k+1 while stage 1 still computes batch k (the stages are
different actors), and several batches can be queued at the workers.

Failure costs (README, Health):
* A batch fault (an exception inside a forward on some rank: an out-of-memory on an odd batch, a kernel
  assertion) costs that batch, not the workers: the rank leaves the process groups
  (`sharding.process_group.detach_process_groups` / `leave_process_groups`), which makes its peers' pending
  receives and collectives raise at once, and they leave too; the engine then has every rank rejoin new groups
  on a new port (`ModelWorker.rejoin`, queued behind the forwards already submitted), weights kept. The faulted
  batch is bisected and retried until the fault is pinned to its prompts (`PartialScores`: those rows fail,
  every other prompt is scored); batches that failed only through the fault are sent again as they were. A
  poison prompt costs a rejoin per bisection step (no weights read), never a reload.
* A dead worker (its actor died: RayActorError from a forward or a ping) is restarted alone
  (`sharding.restart`): the engine is marked recovering, every batch still in flight and every health check
  fails at once with EngineUnavailableError ("recovering": 503 at the router, or retried on another model
  replica), a new actor takes the dead rank's bundle and reads only its shard, and the survivors rejoin new
  process groups with it, weights kept. Then the engine serves again; the Serve replica is not replaced.
* A hung worker (a peer's collective timed out, or the health check below), or a partial restart that fails,
  marks the engine broken and kills every worker, so no rank waits on a dead peer (NCCL never notices one by
  itself); batches in flight fail with EngineUnavailableError, check_health fails, and Serve replaces the
  replica with a fresh placement group.

Health: `check_health` pings every worker in its control concurrency group (`sharding.worker`), which answers
at once even while forwards are queued or running, with how long the rank's current forward has run. A rank
whose forward has run longer than `runtime.collective_timeout_s` (plus `HANG_MARGIN_S`) is hung: the engine
fails as above. Its peers' own collectives and receives raise within that timeout too (the process groups'
steady-state timeout, `sharding.process_group.use_steady_state_timeout`), which fails the batch.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Sequence

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from configs.model import ModelArchConfig
from configs.service import ServiceConfig
from sharding.checkpoints.formats import open_checkpoint
from sharding.placement import placement_for, visible_devices_by_node
from sharding.protocol import BatchFault, EngineUnavailableError, PartialScores
from sharding.micro_batches import plan_micro_batches
from sharding.restart import restart_dead_workers
from sharding.worker import ModelWorker, worker_actor_class

COLLATERAL_RETRIES = 3  # a batch that failed only through other batches' faults is sent again this often
HANG_MARGIN_S = 5.0  # a forward is hung past collective_timeout_s plus this (the peers' timeout fires first)


class MegatronEngine:
    def __init__(self, config: ServiceConfig, placement_group: PlacementGroup | None,
                 worker_class: type[ModelWorker] = ModelWorker):
        """`worker_class`: `ModelWorker`, or a subclass that injects faults in tests."""
        self.config = config
        checkpoint = open_checkpoint(config.checkpoint_path)
        self.arch: ModelArchConfig = checkpoint.arch
        config.parallel.check_against(self.arch)
        self.plan = placement_for(config)
        self._submit_lock = threading.Lock()  # held only while submitting, so every rank sees one order
        self._broken: str | None = None
        self._batch_ids = itertools.count()
        self._in_flight: dict[int, float] = {}  # batch id -> submission time
        self._generation = 0  # process groups rebuilt this often (batch faults); batches record theirs
        self._rejoining: list = []
        self.rejoins = 0
        self._recovering: str | None = None  # why a partial restart (sharding.restart) is running, or None
        self.restarts = 0  # dead workers restarted alone
        self._placement_group = placement_group
        self._actor_class = worker_actor_class(worker_class)
        self.workers = [self._start_worker(slot) for slot in self.plan.workers]
        self.node_info = ray.get([w.node_info.remote() for w in self.workers])
        if self.plan.gpus_per_worker > 0:
            visible = visible_devices_by_node({r: (info[1], info[2]) for r, info in enumerate(self.node_info)})
        else:
            visible = {r: (None, 0) for r in range(len(self.workers))}
        master_addr = self.node_info[0][0]
        master_port = ray.get(self.workers[0].free_port.remote())
        ray.get([w.setup.remote(master_addr, master_port, *visible[r]) for r, w in enumerate(self.workers)])
        # The last stage's TP rank 0 returns the rewards.
        self._output_rank = (config.parallel.pipeline_parallel_size - 1) * config.parallel.tensor_parallel_size

    def _start_worker(self, slot):
        """A worker actor for `slot` (its rank, in its placement-group bundle); `setup` is called separately."""
        strategy = None
        if self._placement_group is not None:
            strategy = PlacementGroupSchedulingStrategy(
                self._placement_group, placement_group_bundle_index=slot.bundle_index,
                placement_group_capture_child_tasks=True,
            )
        options = {"num_cpus": self.plan.cpus_per_worker, "num_gpus": self.plan.gpus_per_worker,
                   "runtime_env": {"env_vars": dict(self.config.runtime.worker_env)}}
        return self._actor_class.options(scheduling_strategy=strategy, **options).remote(
            slot.rank, self.arch, self.config.parallel, self.config.runtime, self.config.checkpoint_path)

    def replace_worker(self, rank: int) -> None:
        """Kills rank `rank`'s actor (if not dead already) and starts a new one in its bundle (sharding.restart)."""
        with self._submit_lock:
            if self._broken:
                raise EngineUnavailableError(self._broken)
            try:
                ray.kill(self.workers[rank], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.workers[rank] = self._start_worker(self.plan.workers[rank])

    def _unavailable(self) -> str | None:
        """Why no batch can run now (broken, or a partial restart running), or None."""
        if self._broken:
            return self._broken
        return f"recovering: {self._recovering}" if self._recovering else None

    def _worker_died(self, reason: str) -> str:
        """Starts the partial restart (once; a thread of its own, so it outlives the caller's event loop) and
        returns why batches are unavailable meanwhile."""
        with self._submit_lock:
            if self._broken is None and self._recovering is None:
                self._recovering = reason
                self._generation += 1  # batches of the old groups never queue a rejoin of their own
                threading.Thread(target=self._recover, name="partial-restart", daemon=True).start()
            return self._unavailable()

    def _recover(self) -> None:
        runtime = self.config.runtime
        timeout_s = runtime.distributed_timeout_s + runtime.collective_timeout_s + HANG_MARGIN_S
        try:
            restarted = restart_dead_workers(self, timeout_s)
        except Exception as e:  # noqa: BLE001 - the partial restart failed: the replica is replaced
            self._fail(f"{self._recovering}; the partial restart failed: {_describe_error(e)}")
            return
        with self._submit_lock:
            if self._broken is None:
                self._recovering = None
                self.restarts += len(restarted)

    async def score(self, token_batch: Sequence[Sequence[int]]) -> np.ndarray | PartialScores:
        """float32 [B, A]; or PartialScores when a fault inside a forward was pinned (by bisection) to some
        prompts: those rows fail, every other prompt of the batch is scored."""
        if self._unavailable():
            raise EngineUnavailableError(self._unavailable())
        rewards, failures = await self._score_or_bisect(list(token_batch))
        return PartialScores(rewards, failures) if failures else rewards

    async def _score_or_bisect(self, batch: list) -> tuple[np.ndarray, dict[int, str]]:
        """Scores `batch`; on a fault of its own, scores its halves (recursively) so only the prompts that
        trigger the fault fail. A batch that failed only because another batch's fault took the process
        groups down is sent again as it is (at most COLLATERAL_RETRIES times)."""
        for _ in range(COLLATERAL_RETRIES):
            try:
                return await self._score_once(batch), {}
            except _CollateralFault:
                continue
            except _OwnFault as fault:
                if len(batch) == 1:
                    return np.full((1, self.arch.num_attributes), np.nan, dtype=np.float32), {0: fault.message}
                half = len(batch) // 2
                (left, left_failed), (right, right_failed) = await asyncio.gather(
                    self._score_or_bisect(batch[:half]), self._score_or_bisect(batch[half:]))
                return (np.concatenate([left, right]),
                        {**left_failed, **{half + row: message for row, message in right_failed.items()}})
        raise EngineUnavailableError(f"a batch failed {COLLATERAL_RETRIES} times because of other batches' faults")

    async def _score_once(self, token_batch: list) -> np.ndarray:
        if self._unavailable():
            raise EngineUnavailableError(self._unavailable())
        micro_batches, order = plan_micro_batches(token_batch, self.config.parallel)
        ref = ray.put(micro_batches)
        with self._submit_lock:
            if self._unavailable():
                raise EngineUnavailableError(self._unavailable())
            refs = [w.forward.remote(ref) for w in self.workers]
            batch_id = next(self._batch_ids)
            generation = self._generation
            self._in_flight[batch_id] = time.monotonic()
        futures = [asyncio.ensure_future(_as_future(r)) for r in refs]
        try:
            done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            for f in done:
                f.result()
            sorted_rewards = await futures[self._output_rank]
        except asyncio.CancelledError:
            # The caller left; the ranks still compute this batch in order: it stays in flight until they do.
            asyncio.gather(*futures, return_exceptions=True).add_done_callback(
                lambda _: self._in_flight.pop(batch_id, None))
            raise
        except Exception:  # noqa: BLE001 - a batch fault (every rank survives) or a lost worker
            # Every rank of a faulted batch returns soon: the faulting rank left the groups, so its peers'
            # pending operations raise at once (and they leave too).
            self._in_flight.pop(batch_id, None)
            first = [f.exception() for f in done if f.exception() is not None]
            if any(_batch_fault(e) is None for e in first):  # a dead or hung worker: no waiting for the rest
                await self._after_fault(first, generation)
            try:
                results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                                 timeout=self.config.runtime.collective_timeout_s + HANG_MARGIN_S)
            except asyncio.TimeoutError:
                self._fail("a model worker did not return from a faulted batch within collective_timeout_s")
                raise EngineUnavailableError(self._broken) from None
            await self._after_fault(results, generation)
            raise AssertionError("unreachable")  # _after_fault always raises
        self._in_flight.pop(batch_id, None)
        rewards = np.empty_like(sorted_rewards)
        rewards[order] = sorted_rewards
        return rewards

    async def _after_fault(self, results: list, generation: int) -> None:
        """Classifies a failed batch's per-rank results and raises: _OwnFault (a rank's own exception),
        _CollateralFault (only peers' faults), after every rank has rejoined new process groups; or, for a dead
        worker, starts the partial restart, and for a hung one fails the engine (EngineUnavailableError)."""
        errors = [r for r in results if isinstance(r, BaseException)]
        faults = [_batch_fault(e) for e in errors]
        if any(f is None for f in faults):
            dead = [e for e in errors if isinstance(e, ray.exceptions.RayActorError)]
            other = dead[0] if dead else next(e for e, f in zip(errors, faults) if f is None)
            if dead:  # a survivor's error (a timeout waiting on the dead rank) must not fail the engine
                raise EngineUnavailableError(self._worker_died(f"a model worker died: {_describe_error(other)}"))
            self._fail(f"a model worker failed: {_describe_error(other)}")
            raise EngineUnavailableError(self._broken)
        await self._rejoin(generation)
        own = [f for f in faults if not f.collateral]
        if own:
            raise _OwnFault("; ".join(str(f) for f in own))
        raise _CollateralFault()

    async def _rejoin(self, generation: int) -> None:
        """Every rank leaves the old process groups and joins new ones on a new port, once per fault (the
        first batch of a generation to see the fault queues it; later batches find the generation moved on).
        The rejoin calls queue behind every forward already submitted, so they run when each rank is idle;
        batches submitted afterwards run on the new groups."""
        port = await self.workers[0].free_port.remote()
        with self._submit_lock:
            if self._unavailable():
                raise EngineUnavailableError(self._unavailable())
            if generation == self._generation:
                self._generation += 1
                master = self.node_info[0][0]
                self._rejoining = [w.rejoin.remote(master, port) for w in self.workers]
                self.rejoins += 1
            pending = self._rejoining
        try:
            await asyncio.wait_for(asyncio.gather(*pending),
                                   timeout=self.config.runtime.collective_timeout_s + HANG_MARGIN_S)
        except Exception as e:  # noqa: BLE001 - a rank that cannot rejoin: the replica is replaced
            self._fail(f"the ranks could not rejoin their process groups after a batch fault: {_describe_error(e)}")
            raise EngineUnavailableError(self._broken) from None

    def _fail(self, reason: str) -> None:
        """Marks the engine broken (first reason wins) and kills every worker so no rank waits on a dead peer."""
        with self._submit_lock:
            if self._broken is None:
                self._broken = reason
            for w in self.workers:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    @property
    def broken(self) -> str | None:
        """Why the engine cannot compute (a worker failed), or None."""
        return self._broken

    @property
    def recovering(self) -> str | None:
        """Why a partial restart is running (a worker died), or None."""
        return None if self._broken else self._recovering

    def describe(self) -> list[dict]:
        """Where each rank runs: rank, stage, TP rank, bundle, node, placement group and Ray actor id."""
        return [
            {"rank": slot.rank, "pipeline_rank": slot.pipeline_rank, "tensor_rank": slot.tensor_rank,
             "bundle_index": slot.bundle_index, "node_id": info[1], "placement_group_id": info[3],
             "actor_id": worker._actor_id.hex()}
            for slot, worker, info in zip(self.plan.workers, self.workers, self.node_info)
        ]

    async def check_health(self) -> None:
        """Pings every worker (control group: answered at once, even with forwards running); fails when a
        worker is dead, misses `runtime.health_check_timeout_s`, or has run its current forward longer than
        `runtime.collective_timeout_s` plus HANG_MARGIN_S (hung). A dead worker starts the partial restart;
        the check fails with "recovering" until it is done."""
        if self._unavailable():
            raise EngineUnavailableError(self._unavailable())
        refs = [w.ping.remote() for w in self.workers]
        try:
            answers = await asyncio.wait_for(asyncio.gather(*refs),
                                             timeout=self.config.runtime.health_check_timeout_s)
        except asyncio.TimeoutError:
            self._fail("a model worker missed its health-check deadline")
            raise EngineUnavailableError(self._broken) from None
        except ray.exceptions.RayActorError as e:
            raise EngineUnavailableError(self._worker_died(f"a model worker died: {type(e).__name__}")) from None
        except ray.exceptions.RayError as e:
            self._fail(f"a model worker failed its health check: {type(e).__name__}")
            raise EngineUnavailableError(self._broken) from None
        limit_s = self.config.runtime.collective_timeout_s + HANG_MARGIN_S
        for rank, running_s in answers:
            if running_s is not None and running_s > limit_s:
                self._fail(f"rank {rank} is hung: its forward has run {running_s:.0f} s; the limit is "
                           f"collective_timeout_s {self.config.runtime.collective_timeout_s:g} s")
                raise EngineUnavailableError(self._broken)

    def simulated_stats(self, reset: bool = False) -> list[dict]:
        """Per rank on a simulated device: modelled busy seconds, micro-batches, wall seconds (bench/simulated.py)."""
        return ray.get([w.simulated_stats.remote(reset) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []


class _OwnFault(Exception):
    """A batch raised inside a forward on some rank (its own fault)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _CollateralFault(Exception):
    """A batch failed only because another batch's fault took the process groups down."""


def _batch_fault(exc: BaseException) -> BatchFault | None:
    """The BatchFault a rank raised (Ray wraps it; `cause` is the original), or None for anything else."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BatchFault):
        return cause
    return exc if isinstance(exc, BatchFault) else None


async def _as_future(ref):
    return await ref


def _describe_error(exc: BaseException) -> str:
    """The error's type, and for an exception raised inside a forward its cause's last line."""
    cause = getattr(exc, "cause", None)
    if cause is None or isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return type(exc).__name__
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1][:300]}" if lines else type(cause).__name__
