"""The token-forest layout (sharding/forest.py) on hand-built batches, its invariants on random ones, the
padded layout under a token budget, and the three forest attention kernels against plain causal attention
of each sequence alone."""

from __future__ import annotations

import random

import numpy as np
import pytest

from configs.service import ParallelConfig
from sharding.forest import ForestRow, build_forest, unique_tokens
from sharding.micro_batches import computed_tokens, plan_micro_batches


def only_row(batch: list[list[int]], budget: int = 4096) -> tuple[ForestRow, np.ndarray]:
    forest = build_forest(batch, budget)
    assert len(forest.rows) == 1
    return forest.rows[0], forest.order


def readout_by_input(forest) -> dict[int, tuple[int, int]]:
    """input index -> (row, node index)."""
    out, r = {}, 0
    for row_index, row in enumerate(forest.rows):
        for node in row.readout:
            out[int(forest.order[r])] = (row_index, int(node))
            r += 1
    return out


def check_paths(batch: list[list[int]], budget: int) -> None:
    """Every sequence's readout node sees exactly its own tokens at positions 0..len-1, and every node's
    visible keys form one root path."""
    forest = build_forest(batch, budget)
    assert sorted(forest.order.tolist()) == list(range(len(batch)))
    for row in forest.rows:
        assert row.num_tokens <= budget
        allowed = row.allowed()
        for q in range(row.num_tokens):
            keys = np.flatnonzero(allowed[q])
            assert keys[-1] == q
            assert row.positions[keys].tolist() == list(range(row.positions[q] + 1))
        for j in range(len(row.branch_starts) - 1):
            q1 = row.branch_starts[j + 1]
            keys = row.branch_keys[row.branch_key_starts[j]:row.branch_key_starts[j + 1]]
            assert keys.tolist() == np.flatnonzero(allowed[q1 - 1]).tolist()
    for i, (r, node) in readout_by_input(forest).items():
        row = forest.rows[r]
        keys = np.flatnonzero(row.allowed()[node])
        assert row.tokens[keys].tolist() == list(batch[i])


def test_duplicates_read_the_same_node():
    row, order = only_row([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    assert row.tokens.tolist() == [1, 2, 3]
    assert row.positions.tolist() == [0, 1, 2]
    assert row.readout.tolist() == [2, 2, 2]
    assert sorted(order.tolist()) == [0, 1, 2]


def test_a_sequence_that_is_a_prefix_of_another():
    row, order = only_row([[1, 2, 3, 4], [1, 2]])
    assert row.tokens.tolist() == [1, 2, 3, 4]
    assert row.positions.tolist() == [0, 1, 2, 3]
    assert row.subtree_end.tolist() == [3, 3, 3, 3]
    assert order.tolist() == [1, 0] and row.readout.tolist() == [1, 3]


def test_no_sharing_is_block_diagonal_causal_packing():
    row, order = only_row([[5, 6], [1, 2, 3]])
    assert row.tokens.tolist() == [1, 2, 3, 5, 6]
    assert row.positions.tolist() == [0, 1, 2, 0, 1]
    assert row.subtree_end.tolist() == [2, 2, 2, 4, 4]
    assert order.tolist() == [1, 0] and row.readout.tolist() == [2, 4]
    block = np.zeros((5, 5), dtype=bool)
    block[:3, :3] = np.tril(np.ones((3, 3), dtype=bool))
    block[3:, 3:] = np.tril(np.ones((2, 2), dtype=bool))
    assert (row.allowed() == block).all()


def test_three_branch_levels():
    batch = [[1, 7, 8], [9], [1, 2, 3, 5], [1, 2, 6], [1, 2, 3, 4]]
    row, order = only_row(batch)
    assert row.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert row.positions.tolist() == [0, 1, 2, 3, 3, 2, 1, 2, 0]
    assert row.subtree_end.tolist() == [7, 5, 4, 3, 4, 5, 7, 7, 8]
    assert order.tolist() == [4, 2, 3, 0, 1] and row.readout.tolist() == [3, 4, 5, 7, 8]
    assert unique_tokens(batch) == 9
    # the branch of [1, 2, 6] is node 5; it sees 1, 2 (shared) and itself
    j = row.branch_starts.tolist().index(5)
    assert row.branch_keys[row.branch_key_starts[j]:row.branch_key_starts[j + 1]].tolist() == [0, 1, 5]
    check_paths(batch, 4096)


def test_a_trie_over_the_budget_is_cut_and_repeats_its_shared_prefix():
    batch = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 7, 8]]
    forest = build_forest(batch, max_tokens_per_micro_batch=7)
    assert [r.tokens.tolist() for r in forest.rows] == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8]]
    assert forest.rows[1].positions.tolist() == [0, 1, 2, 3, 4]
    assert forest.computed_tokens == 11 and unique_tokens(batch) == 8
    check_paths(batch, 7)


def test_a_trie_that_fits_a_row_is_never_cut():
    """Two GRPO-like groups (a prompt and its responses): 6 and 5 nodes under a budget of 8. Filling rows in
    sorted order would cut the second group at the row boundary and compute its prompt twice (13 nodes);
    whole tries packed first fit compute each prompt once (11 nodes, the unique count), in two rows."""
    a = [[1, 1, 1, 2], [1, 1, 1, 3], [1, 1, 1, 4]]  # trie of 3 + 3 nodes
    b = [[2, 2, 2, 5], [2, 2, 2, 6]]  # trie of 3 + 2 nodes
    batch = b + a
    forest = build_forest(batch, max_tokens_per_micro_batch=8)
    assert forest.computed_tokens == unique_tokens(batch) == 11
    assert [r.tokens.tolist() for r in forest.rows] == [[1, 1, 1, 2, 3, 4], [2, 2, 2, 5, 6]]
    check_paths(batch, 8)
    small = [[3, 7]]  # a third trie of 2 nodes fills the first row, not a third one
    assert [r.num_tokens for r in build_forest(batch + small, 8).rows] == [8, 5]
    check_paths(batch + small, 8)


def test_a_max_length_prompt_fits_its_budget():
    prompt = list(range(1, 4097))
    forest = build_forest([prompt, prompt[:100]], max_tokens_per_micro_batch=4096)
    assert [r.num_tokens for r in forest.rows] == [4096]
    with pytest.raises(ValueError, match="a sequence has 4097 tokens; max_tokens_per_micro_batch is 4096"):
        build_forest([prompt + [1]], max_tokens_per_micro_batch=4096)
    with pytest.raises(ValueError, match="at least one token"):
        build_forest([[1], []], 10)


@pytest.mark.parametrize("seed", range(8))
def test_random_batches_keep_every_path(seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 6) for _ in range(rng.randrange(1, 12))] for _ in range(4)]
    batch = []
    for _ in range(rng.randrange(1, 14)):
        p = rng.choice(prompts)
        batch.append(p[:rng.randrange(1, len(p) + 1)] + [rng.randrange(1, 4) for _ in range(rng.randrange(0, 5))])
    budget = max(len(s) for s in batch) + rng.randrange(0, 20)
    check_paths(batch, budget)
    computed = build_forest(batch, budget).computed_tokens
    assert unique_tokens(batch) <= computed <= sum(len(s) for s in batch)
    # every trie that fits a row alone is computed once
    tries = {}
    for seq in batch:
        tries.setdefault(seq[0], []).append(seq)
    if all(unique_tokens(group) <= budget for group in tries.values()):
        assert computed == unique_tokens(batch)


def test_padded_layout_under_a_token_budget():
    padded = ParallelConfig(max_tokens_per_micro_batch=10, batch_layout="padded")
    micro, order = plan_micro_batches([[1] * 5, [2], [3] * 3, [4] * 2], padded)
    assert [t.shape for t, _ in micro] == [(2, 5), (2, 2)]  # count x longest <= 10, longest first
    assert [lengths.tolist() for _, lengths in micro] == [[5, 3], [2, 1]]
    assert order.tolist() == [0, 2, 3, 1]
    with pytest.raises(ValueError, match="a sequence has 11 tokens; max_tokens_per_micro_batch is 10"):
        plan_micro_batches([[1] * 11], padded)
    assert computed_tokens([[1] * 5, [2], [3] * 3, [4] * 2], padded) == 14
    forest = ParallelConfig(max_tokens_per_micro_batch=10)
    assert computed_tokens([[1, 2, 3], [1, 2, 4], [1, 2]], forest) == 4
    rows, order = plan_micro_batches([[1, 2, 3], [1, 2, 4]], forest)
    assert [r.tokens.tolist() for r in rows] == [[1, 2, 3, 4]] and order.tolist() == [0, 1]


@pytest.mark.parametrize("kernel", ["branches", "dense", "flex"])
def test_forest_attention_equals_each_sequence_alone(kernel):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from sharding.layers import ForestMask

    batch = [[1, 7, 8], [9], [1, 2, 3, 5], [1, 2, 6], [1, 2, 3, 4], [1, 2, 6], [1, 2]]
    row, order = only_row(batch)
    n, heads, groups, dim = row.num_tokens, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    embed_q = torch.randn(10, heads, dim, generator=gen)  # per token id: attention is then a function of the path
    embed_kv = torch.randn(10, groups, dim, generator=gen)
    tokens = torch.from_numpy(row.tokens)

    def qkv(ids):
        q = embed_q[ids].permute(1, 0, 2).unsqueeze(0)
        kv = embed_kv[ids].permute(1, 0, 2).unsqueeze(0)
        return q, kv, kv * 2

    out = ForestMask(row, kernel, torch.device("cpu")).attend(*qkv(tokens), scale=None)
    assert out.shape == (1, heads, n, dim)
    for r, i in enumerate(order.tolist()):
        q, k, v = qkv(torch.tensor(batch[i]))
        alone = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[0, :, row.readout[r]], alone[0, :, -1], atol=1e-6, rtol=0)


def test_sequence_parallel_pads_rows_to_a_multiple_of_tp_without_touching_real_nodes():
    from sharding.forest import pad_row

    batch = [[1, 2, 3], [1, 2, 4], [5]]
    row, _ = only_row(batch)  # 5 nodes
    padded = pad_row(row, 4)
    assert padded.num_tokens == 8 and pad_row(row, 5) is row
    assert padded.tokens[5:].tolist() == [0, 0, 0] and padded.positions[5:].tolist() == [0, 1, 2]
    allowed = padded.allowed()
    assert (allowed[:5, :5] == row.allowed()).all()
    assert not allowed[:5, 5:].any() and not allowed[5:, :5].any()  # no real node sees a pad, nor the reverse
    assert padded.readout.tolist() == row.readout.tolist()
    keys = padded.branch_keys[padded.branch_key_starts[-2]:padded.branch_key_starts[-1]]
    assert keys.tolist() == [5, 6, 7] and padded.branch_starts[-2:].tolist() == [5, 8]
    sp = ParallelConfig(tensor_parallel_size=4, sequence_parallel=True, max_tokens_per_micro_batch=16)
    rows, _ = plan_micro_batches(batch, sp)
    assert [r.num_tokens for r in rows] == [8] and computed_tokens(batch, sp) == 8
    padded_sp = ParallelConfig(tensor_parallel_size=4, sequence_parallel=True, batch_layout="padded",
                               max_tokens_per_micro_batch=16)
    micro, _ = plan_micro_batches(batch, padded_sp)
    assert [t.shape for t, _ in micro] == [(3, 4)] and computed_tokens(batch, padded_sp) == 12
