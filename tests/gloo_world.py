"""A CPU torch.distributed world (gloo) of fresh processes for tests and benchmarks, without Ray.

`run_world(world_size, tp, pp, fn, *args)` starts `world_size` spawned processes, each joining the world
and megatron's parallel state at TP x PP, calls `fn(rank, *args)` (a module-level function) and returns
the ranks' results in rank order. Also: `score_stage`, a forward of one batch through this rank's stage
(TP: every rank computes; PP: hidden states go stage to stage with send/recv).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _entry(rank: int, world_size: int, tp: int, pp: int, port: int, fn: Callable, args: tuple, results) -> None:
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import warnings

        warnings.filterwarnings("ignore")
        from configs.service import RuntimeConfig
        from sharding.process_group import destroy_model_parallel, init_model_parallel

        init_model_parallel(RuntimeConfig(torch_threads_per_worker=1), rank, world_size, "127.0.0.1", port,
                            tp=tp, pp=pp)
        try:
            results.put((rank, True, fn(rank, *args)))
        finally:
            destroy_model_parallel()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_world(world_size: int, tp: int, pp: int, fn: Callable, *args: Any, timeout_s: float = 600) -> list[Any]:
    from sharding.process_group import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, tp, pp, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors = []
    try:
        while len(out) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"gloo world: no result within {timeout_s}s ({len(out)} of {world_size})") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may be stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [out[r] for r in range(world_size)]


def score_stage(model, arch, token_batch: Sequence[Sequence[int]]) -> np.ndarray | None:
    """One right-padded batch through this rank's stage; the rewards on the last stage's TP rank 0."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    lengths = torch.tensor([len(t) for t in token_batch], dtype=torch.int64)
    tokens = torch.zeros((len(token_batch), int(lengths.max())), dtype=torch.int64)
    for i, t in enumerate(token_batch):
        tokens[i, : len(t)] = torch.tensor(t)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    with torch.no_grad():
        if not first:
            hidden = torch.empty((tokens.shape[1], tokens.shape[0], arch.hidden_size), dtype=torch.float32)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens if first else None, lengths)
        if not last:
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return out.float().numpy()


def load_and_score(rank: int, tp: int, pp: int, checkpoints: dict[str, str], token_batch: list[list[int]]
                   ) -> dict[str, dict]:
    """For each checkpoint: build this rank's stage, load its slice, score `token_batch`. Per checkpoint:
    `scores` (last stage, TP rank 0; else None), `zarr_bytes` (bytes read per key, zarr only) and
    `split_axes` (key -> axes megatron splits this rank's ShardedTensors on, stacked axis excluded) and
    `parameters` (how many this rank's model holds)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from configs.service import RuntimeConfig
    from sharding.checkpoints.nemo_weights import load_weights, sharded_state_dict
    from sharding.model import build_stage_model
    from sharding.checkpoints.nemo import NemoCheckpoint

    runtime = RuntimeConfig(torch_threads_per_worker=1)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    out = {}
    for name, path in checkpoints.items():
        checkpoint = NemoCheckpoint.open(path)
        model = build_stage_model(checkpoint.arch, runtime, tp=tp, pp=pp, pp_rank=pp_rank)
        report = load_weights(model, checkpoint.weights_dir)
        split_axes = {}
        for sh in sharded_state_dict(model, prefix="").values():
            if isinstance(sh, ShardedTensor):
                frag = sh.axis_fragmentations[sh.prepend_axis_num:]
                split_axes[sh.key] = [a for a, f in enumerate(frag) if f > 1]
        out[name] = {
            "scores": score_stage(model, checkpoint.arch, token_batch),
            "zarr_bytes": dict(report.zarr_stats.bytes_by_key) if report.zarr_stats else None,
            "split_axes": split_axes,
            "parameters": sum(p.numel() for p in model.parameters()),
            "backend": report.backend,
            "key_prefix": report.key_prefix,
        }
    return out
