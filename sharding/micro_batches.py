"""The engine's batch layout, numpy only (no torch, no Ray): a batch is sorted by length, cut into
micro-batches of `micro_batch_size` sequences, and each micro-batch right-padded to its own longest
sequence. The router's padding metric and the benchmarks count padding with the same layout."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MicroBatch = tuple[np.ndarray, np.ndarray]  # tokens int64 [b, s] (right-padded), lengths int64 [b]


def micro_batch_groups(lengths: Sequence[int], micro_batch_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Indices of each micro-batch (longest sequences first) and the length-sorting permutation."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start:start + micro_batch_size] for start in range(0, len(order), micro_batch_size)], order


def make_micro_batches(token_batch: Sequence[Sequence[int]], micro_batch_size: int,
                       pad_id: int = 0) -> tuple[list[MicroBatch], np.ndarray]:
    """Length-sorted, right-padded micro-batches and the permutation that produced them."""
    lengths = np.array([len(t) for t in token_batch], dtype=np.int64)
    if len(lengths) == 0 or lengths.min() < 1:
        raise ValueError("every sequence needs at least one token")
    groups, order = micro_batch_groups(lengths, micro_batch_size)
    micro_batches: list[MicroBatch] = []
    for idx in groups:
        tokens = np.full((len(idx), int(lengths[idx].max())), pad_id, dtype=np.int64)
        for row, i in enumerate(idx):
            tokens[row, : lengths[i]] = token_batch[i]
        micro_batches.append((tokens, lengths[idx]))
    return micro_batches, order


def padded_tokens(lengths: Sequence[int], micro_batch_size: int) -> int:
    """Tokens the engine computes for one batch with this layout (real tokens plus padding)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    groups, _ = micro_batch_groups(lengths, micro_batch_size)
    return int(sum(lengths[idx].max() * len(idx) for idx in groups))
