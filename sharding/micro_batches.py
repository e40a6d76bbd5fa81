"""The engine's batch layouts, numpy only (no torch, no Ray), chosen by `parallel.batch_layout`:

* `forest` (`sharding.forest`): prefix tries packed into rows of at most `max_tokens_per_micro_batch`
  nodes; shared prefixes are computed once and nothing is padded.
* `padded`: the batch sorted by length (longest first) and cut into micro-batches of as many sequences as
  fit `max_tokens_per_micro_batch` once right-padded to their longest; each micro-batch is right-padded.

`plan_micro_batches` is the one entry point (the engine, the in-process scorer, the benchmarks and the
tests use it); the router's metrics and the benchmarks count computed tokens with `computed_tokens`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from configs.service import ParallelConfig
from sharding.forest import ForestRow, build_forest, pad_row

MicroBatch = tuple[np.ndarray, np.ndarray]  # tokens int64 [b, s] (right-padded), lengths int64 [b]


def budget_groups(lengths: Sequence[int], max_tokens_per_micro_batch: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Indices of each padded micro-batch under a token budget (count x longest <= budget, longest first)
    and the length-sorting permutation."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens_per_micro_batch:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.array(g, dtype=np.int64) for g in groups], order


def _padded(token_batch: Sequence[Sequence[int]], groups: list[np.ndarray], pad_id: int) -> list[MicroBatch]:
    lengths = np.array([len(t) for t in token_batch], dtype=np.int64)
    micro_batches: list[MicroBatch] = []
    for idx in groups:
        tokens = np.full((len(idx), int(lengths[idx].max())), pad_id, dtype=np.int64)
        for row, i in enumerate(idx):
            tokens[row, : lengths[i]] = token_batch[i]
        micro_batches.append((tokens, lengths[idx]))
    return micro_batches


def _check_lengths(token_batch: Sequence[Sequence[int]]) -> np.ndarray:
    lengths = np.array([len(t) for t in token_batch], dtype=np.int64)
    if len(lengths) == 0 or lengths.min() < 1:
        raise ValueError("every sequence needs at least one token")
    return lengths


def _padded_micro_batches(token_batch: Sequence[Sequence[int]], max_tokens_per_micro_batch: int,
                              pad_id: int = 0) -> tuple[list[MicroBatch], np.ndarray]:
    """Length-sorted, right-padded micro-batches under a token budget and the order of their rows."""
    lengths = _check_lengths(token_batch)
    if lengths.max() > max_tokens_per_micro_batch:
        raise ValueError(f"a sequence has {lengths.max()} tokens; max_tokens_per_micro_batch is "
                         f"{max_tokens_per_micro_batch}")
    groups, _ = budget_groups(lengths, max_tokens_per_micro_batch)
    return _padded(token_batch, groups, pad_id), np.concatenate(groups)


def token_multiple(parallel: ParallelConfig) -> int:
    """What every micro-batch's token count (per row) must be a multiple of: the TP size under sequence
    parallelism (megatron-core splits the sequence evenly over the TP ranks), else 1."""
    return parallel.tensor_parallel_size if parallel.sequence_parallel else 1


def pad_padded(micro_batch: MicroBatch, multiple: int, pad_id: int = 0) -> MicroBatch:
    """A right-padded micro-batch with its length rounded up to `multiple`: more right padding, which causal
    attention keeps from every scored position."""
    tokens, lengths = micro_batch
    extra = -tokens.shape[1] % multiple
    if extra == 0:
        return micro_batch
    return np.pad(tokens, ((0, 0), (0, extra)), constant_values=pad_id), lengths


def plan_micro_batches(token_batch: Sequence[Sequence[int]], parallel: ParallelConfig
                       ) -> tuple[list[MicroBatch] | list[ForestRow], np.ndarray]:
    """The engine's micro-batches for `parallel.batch_layout` and `order`: output row r is the sequence
    `order[r]` of the batch (rows of all micro-batches concatenated). Under sequence parallelism each
    micro-batch is padded to a multiple of the TP size (`token_multiple`); pads are never read out."""
    multiple = token_multiple(parallel)
    if parallel.batch_layout == "forest":
        forest = build_forest(token_batch, parallel.max_tokens_per_micro_batch)
        return [pad_row(row, multiple) for row in forest.rows], forest.order
    micro_batches, order = _padded_micro_batches(token_batch, parallel.max_tokens_per_micro_batch)
    return [pad_padded(mb, multiple) for mb in micro_batches], order


def computed_tokens(token_batch: Sequence[Sequence[int]], parallel: ParallelConfig) -> int:
    """Tokens the engine computes for one batch with the configured layout (padding and repeated prefixes
    included, and the sequence-parallel pads of `token_multiple`)."""
    m = token_multiple(parallel)
    if parallel.batch_layout == "forest":
        rows = build_forest(token_batch, parallel.max_tokens_per_micro_batch).rows
        return int(sum(-(-row.num_tokens // m) * m for row in rows))
    lengths = _check_lengths(token_batch)
    groups, _ = budget_groups(lengths, parallel.max_tokens_per_micro_batch)
    return int(sum(-(-int(lengths[idx].max()) // m) * m * len(idx) for idx in groups))
