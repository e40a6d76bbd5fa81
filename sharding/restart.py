"""Partial restart: a dead model worker is replaced alone (issue 22), not the whole replica.

When a worker actor dies (its process killed, its node's raylet lost it), `sharding.engine.MegatronEngine` marks
itself recovering (batches and health checks fail with EngineUnavailableError "recovering", a 503 or a failover
to another model replica) and runs `restart_dead_workers` on a thread of its own:

1. every rank is pinged in its control concurrency group; a rank whose actor is dead (RayActorError) is
   restarted, any other error or a missed deadline fails the restart;
2. each dead rank gets a new actor of the same worker class, in the same placement-group bundle, with the same
   rank, options and environment (`MegatronEngine._start_worker`);
3. every rank joins new process groups on a new rendezvous port at once: the new actor through `setup` (it
   joins, builds its stage and reads only its own shard of the checkpoint), the survivors through `rejoin`
   (the batch-fault mechanism: they leave the old groups, join the new ones and put them back into their model;
   their weights stay in memory and their actor ids stay). A survivor's `rejoin` queues behind its forwards
   already submitted, which fail at once (the dead peer's sockets closed) or within `collective_timeout_s`.

The engine then serves again; the Serve replica is not replaced. If anything here fails (another rank dies, the
rendezvous or the shard read times out), the engine falls back to failing as before: it is marked broken, every
worker is killed, and Serve replaces the replica.
"""

from __future__ import annotations

import time

import ray

from sharding.placement import visible_devices_by_node


def dead_ranks(workers: list, timeout_s: float) -> list[int]:
    """Ranks whose actor is dead (its ping raises RayActorError). Raises RuntimeError for a rank that answers
    with anything else or not within `timeout_s` (a hung rank is not restarted alone)."""
    refs = [w.ping.remote() for w in workers]
    deadline = time.monotonic() + timeout_s
    dead = []
    for rank, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            dead.append(rank)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"rank {rank} did not answer its ping within {timeout_s:g} s") from None
    return dead


def restart_dead_workers(engine, timeout_s: float) -> list[int]:
    """Replaces the engine's dead workers and has every rank join new process groups (module docstring); returns
    the restarted ranks. Raises on any failure (the engine then fails as a whole)."""
    runtime = engine.config.runtime
    dead = dead_ranks(engine.workers, runtime.health_check_timeout_s)
    if not dead:
        raise RuntimeError("a worker failed but every rank answers its ping")
    for rank in dead:
        engine.replace_worker(rank)
    new_info = ray.get([engine.workers[rank].node_info.remote() for rank in dead], timeout=timeout_s)
    for rank, info in zip(dead, new_info):
        engine.node_info[rank] = info
    if engine.plan.gpus_per_worker > 0:
        visible = visible_devices_by_node({r: (info[1], info[2]) for r, info in enumerate(engine.node_info)})
    else:
        visible = {r: (None, 0) for r in range(len(engine.workers))}
    master_addr = engine.node_info[0][0]  # rank 0's bundle, so its node, is the same even when rank 0 restarted
    port = ray.get(engine.workers[0].free_port.remote(), timeout=timeout_s)
    refs = [w.setup.remote(master_addr, port, *visible[rank], alone=True) if rank in dead else w.rejoin.remote(master_addr, port)
            for rank, w in enumerate(engine.workers)]
    ray.get(refs, timeout=timeout_s)
    return dead
