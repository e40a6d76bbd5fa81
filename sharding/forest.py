"""Token-forest batch layout, numpy only (no torch, no Ray): sequences that share a token prefix compute
it once.

Causal attention makes the hidden state at position t depend only on tokens 0..t, so sequences with a
common prefix have identical hidden states on it. A batch is merged into prefix tries of token ids:

* Sort the sequences lexicographically; the longest common prefix (LCP) of each sequence with its sorted
  predecessor is the part it shares. Emitting, in sorted order, each sequence's tokens after its LCP is
  the tries' DFS preorder (O(total tokens) after the sort). A sequence equal to its predecessor (a
  duplicate) adds no token; one that is a prefix of its successor adds its tokens and its successor
  continues from them.
* Every token (node) gets its depth as its position id (RoPE) and `subtree_end`, the index of the last
  node of its subtree. Query q may attend key k iff `k <= q <= subtree_end[k]` (k is q's ancestor or q).
  Unrelated sequences become plain block-diagonal causal packing (no padding); the per-turn prefixes of
  one conversation share everything up to each turn; N responses to one prompt compute it once.
* Sorted sequences are packed next-fit into rows of at most `max_tokens_per_micro_batch` nodes, one row
  per micro-batch. A trie larger than the budget is cut between two sorted sequences: the sub-trie that
  starts there repeats its shared prefix. Any single sequence up to the budget fits.
* Readout: each sequence reads the final hidden state of its last token's node (duplicates read the
  same node).

Each row also lists its *branches* (the new nodes one sequence adds: contiguous in preorder) with their
key indices (the branch's ancestors, then the branch itself), for attention that runs per branch instead
of over a dense row x row mask. The router counts `unique_tokens` with the same code, without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ForestRow:
    """One micro-batch: a packed row of trie nodes in DFS preorder."""

    tokens: np.ndarray  # int64 [n]: token id of each node
    positions: np.ndarray  # int64 [n]: depth of each node (its position id)
    subtree_end: np.ndarray  # int64 [n]: index of the last node in each node's subtree
    readout: np.ndarray  # int64 [k]: node read by each of this row's sequences (ForestBatch.order)
    branch_starts: np.ndarray  # int64 [m + 1]: branch j's queries are nodes [starts[j], starts[j + 1])
    branch_key_starts: np.ndarray  # int64 [m + 1]: branch j's keys are branch_keys[ks[j]:ks[j + 1]]
    branch_keys: np.ndarray  # int64: per branch, its ancestors' node indices then its own nodes

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def allowed(self) -> np.ndarray:
        """Dense bool [n, n] mask: allowed[q, k] iff k <= q <= subtree_end[k]."""
        q = np.arange(self.num_tokens)[:, None]
        k = np.arange(self.num_tokens)[None, :]
        return (k <= q) & (q <= self.subtree_end[None, :])


@dataclass(frozen=True)
class ForestBatch:
    rows: list[ForestRow]
    order: np.ndarray  # int64 [B]: the input index of each readout, rows concatenated in order

    @property
    def computed_tokens(self) -> int:
        return sum(row.num_tokens for row in self.rows)


def _as_arrays(token_batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
    seqs = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_batch]
    if not seqs or min(len(s) for s in seqs) < 1:
        raise ValueError("every sequence needs at least one token")
    return seqs


def sorted_with_lcp(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Lexicographic order of the sequences and, per sorted position, the LCP with the previous one (0 first)."""
    order = np.array(sorted(range(len(seqs)), key=lambda i: seqs[i].tolist()), dtype=np.int64)
    lcp = np.zeros(len(seqs), dtype=np.int64)
    for j in range(1, len(order)):
        a, b = seqs[order[j - 1]], seqs[order[j]]
        m = min(len(a), len(b))
        diff = np.flatnonzero(a[:m] != b[:m])
        lcp[j] = diff[0] if diff.size else m
    return order, lcp


def unique_tokens(token_batch: Sequence[Sequence[int]]) -> int:
    """Tokens of the batch's prefix tries (every shared prefix counted once), before any budget cut."""
    seqs = _as_arrays(token_batch)
    order, lcp = sorted_with_lcp(seqs)
    return int(sum(len(seqs[i]) for i in order) - lcp.sum())


def _subtree_end(positions: np.ndarray) -> np.ndarray:
    """In preorder, a node's subtree ends just before the next node that is not deeper than it."""
    n = len(positions)
    end = np.full(n, n - 1, dtype=np.int64)
    stack: list[int] = []
    for k, depth in enumerate(positions.tolist()):
        while stack and positions[stack[-1]] >= depth:
            end[stack.pop()] = k - 1
        stack.append(k)
    return end


def _build_row(seqs: Sequence[np.ndarray], lcps: Sequence[int]) -> ForestRow:
    """One row from sorted sequences and their LCPs with their predecessor (the first one's is ignored)."""
    longest = max(len(s) for s in seqs)
    path = np.zeros(longest, dtype=np.int64)  # node index at each depth of the current path
    tokens, positions, readout, starts, key_starts, keys = [], [], [], [0], [0], []
    n = 0
    for j, seq in enumerate(seqs):
        length, shared = len(seq), (int(lcps[j]) if j else 0)
        if shared == length:  # a duplicate of the previous sequence: read the same node
            readout.append(int(path[length - 1]))
            continue
        path[shared:length] = np.arange(n, n + length - shared)
        tokens.append(seq[shared:])
        positions.append(np.arange(shared, length, dtype=np.int64))
        keys.append(path[:length].copy())
        n += length - shared
        starts.append(n)
        key_starts.append(key_starts[-1] + length)
        readout.append(n - 1)
    pos = np.concatenate(positions)
    return ForestRow(
        tokens=np.concatenate(tokens), positions=pos, subtree_end=_subtree_end(pos),
        readout=np.array(readout, dtype=np.int64), branch_starts=np.array(starts, dtype=np.int64),
        branch_key_starts=np.array(key_starts, dtype=np.int64), branch_keys=np.concatenate(keys),
    )


def pad_row(row: ForestRow, multiple: int, pad_id: int = 0) -> ForestRow:
    """`row` with its node count rounded up to a multiple of `multiple` (sequence parallelism splits the row's
    tokens evenly over the TP ranks). The pads form one more trie: a chain of `pad_id` tokens at positions
    0, 1, ... that nothing reads out. A node attends only to its ancestors, so no real node sees a pad, and
    the pads see only each other: every kernel computes them like any branch (no uninitialised rows)."""
    p = -row.num_tokens % multiple
    if p == 0:
        return row
    n = row.num_tokens
    pads = np.arange(n, n + p, dtype=np.int64)
    return ForestRow(
        tokens=np.concatenate([row.tokens, np.full(p, pad_id, dtype=np.int64)]),
        positions=np.concatenate([row.positions, np.arange(p, dtype=np.int64)]),
        subtree_end=np.concatenate([row.subtree_end, np.full(p, n + p - 1, dtype=np.int64)]),
        readout=row.readout,
        branch_starts=np.append(row.branch_starts, n + p),
        branch_key_starts=np.append(row.branch_key_starts, row.branch_key_starts[-1] + p),
        branch_keys=np.concatenate([row.branch_keys, pads]),
    )


def build_forest(token_batch: Sequence[Sequence[int]], max_tokens_per_micro_batch: int) -> ForestBatch:
    """The batch as prefix tries packed into rows of at most `max_tokens_per_micro_batch` nodes.

    A trie that fits a row is never cut: whole tries are packed first fit, largest first, so a row boundary
    never makes a fitting trie compute its shared prefix twice (GRPO groups of one prompt and its responses).
    Only a trie larger than a row is cut, in sorted order, each piece repeating the prefix it starts under."""
    seqs = _as_arrays(token_batch)
    longest = max(len(s) for s in seqs)
    if longest > max_tokens_per_micro_batch:
        raise ValueError(f"a sequence has {longest} tokens; max_tokens_per_micro_batch is "
                         f"{max_tokens_per_micro_batch}")
    order, lcp = sorted_with_lcp(seqs)
    pieces: list[list] = []  # [nodes, positions in sorted order]: whole tries or cut pieces
    for j, i in enumerate(order):
        added = len(seqs[i]) - int(lcp[j])
        if j and lcp[j] > 0 and pieces[-1][0] + added <= max_tokens_per_micro_batch:
            pieces[-1][0] += added
            pieces[-1][1].append(j)
        else:  # a new trie (lcp 0), or a cut inside one that repeats the shared prefix
            pieces.append([len(seqs[i]), [j]])
    groups: list[list[int]] = []  # positions of each row
    free: list[int] = []  # nodes left in each row
    for nodes, positions in sorted(pieces, key=lambda piece: -piece[0]):  # stable: ties keep sorted order
        row = next((r for r, left in enumerate(free) if nodes <= left), None)
        if row is None:
            groups.append([])
            free.append(max_tokens_per_micro_batch)
            row = len(free) - 1
        groups[row].extend(positions)
        free[row] -= nodes
    starts = {positions[0] for _, positions in pieces}  # each piece's first sequence computes its whole prefix
    rows = [_build_row([seqs[order[j]] for j in group], [0 if j in starts else lcp[j] for j in group])
            for group in groups]
    return ForestBatch(rows=rows, order=np.asarray([order[j] for group in groups for j in group], dtype=np.int64))
