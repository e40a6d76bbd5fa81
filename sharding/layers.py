"""The two modules this project plugs into megatron-core's local layer spec.

* `Norm`: LayerNorm, LayerNorm with the weight stored zero-centred (NeMo's "layernorm1p", applied as
  weight + 1, the 1 added in float32), or RMSNorm (Llama), chosen by the TransformerConfig; computed in
  float32 whatever the parameter dtype, as Transformer Engine computes it. megatron's torch norm refuses
  `layernorm_zero_centered_gamma`, and apex / TE are not installed everywhere, so the norm is ours. Its
  parameters keep megatron's names (`weight`, `bias`), so the local spec's key map reads
  Transformer-Engine checkpoints.
* `SDPACoreAttention`: core attention on `torch.nn.functional.scaled_dot_product_attention` with a causal
  mask. It replaces megatron's `DotProductAttention`, which builds its mask on CUDA and forks a CUDA RNG for
  dropout, and it is the fast path on GPU (on one H100, bf16, a 15B-like shape: 56% MFU against 30% with
  megatron's unfused attention). Right padding + causal attention means pads never influence
  the positions that are scored. With a `ForestMask` as the attention mask it computes the token-forest
  mask instead (`sharding.forest`: query q attends key k iff k <= q <= subtree_end[k]).
* `ForestMask`: that mask for one packed row, built once per micro-batch on each stage from the row's
  numpy metadata, with one of three kernels (`runtime.forest_attention`):
  - `flex`: `torch.nn.attention.flex_attention` with a block mask from `subtree_end`; block sparsity skips
    the all-masked blocks (other tries, other branches). On CUDA both `create_block_mask` and
    `flex_attention` are wrapped in `torch.compile(dynamic=True)` once per process (the supported way;
    `create_block_mask(_compile=True)` is deprecated) and reused for every row length; the worker compiles
    them at setup (`sharding.warmup`). On CPU the same BlockMask and the same flex_attention call run eagerly
    by default (`COMPILE_FLEX_ON`): torch 2.13's CPU flex template compiles with dynamic shapes only up to
    256 tokens (longer rows fail in its generated C++: `cur_qSplitSize8` undeclared) and static shapes
    recompile for every row length (~40 s each on a 2-core machine). tests/unit/test_flex_compile.py
    compiles it on CPU for rows up to 256 tokens.
  - `branches`: one SDPA call per branch (the nodes one sequence adds) over the keys it may see (its
    ancestors, then itself, bottom-right causal): the attention work of scoring each sequence alone
    minus its shared prefix. The CPU path. A boolean mask sends CPU SDPA to its math kernel, which
    materialises every score (measured: a batch of ~2,300-token conversations that share only the
    template's first tokens ran at ~3,200 tokens/s, each scored alone at ~4,500). So a branch whose
    shared prefix is no longer than itself is computed as one causal SDPA over its ancestors and itself,
    queries included, and the ancestors' rows are dropped: the fused causal kernel, for at most twice the
    attention work of the branch; longer prefixes (best-of-N responses under a long prompt) keep the mask.
  - `dense`: SDPA with the row x row boolean mask; quadratic in the row, a reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from sharding.forest import ForestRow

COMPILE_FLEX_ON = {"cuda"}  # device types whose flex kernels are compiled (see the module docstring for CPU)
_flex_kernels: dict[bool, tuple] = {}  # compiled? -> (create_block_mask, flex_attention), built once per process


def flex_kernels(device: torch.device) -> tuple:
    """(create_block_mask, flex_attention) for `device`: each wrapped once per process in
    `torch.compile(dynamic=True)` where `COMPILE_FLEX_ON` says so (every row has its own length), else eager."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = device.type in COMPILE_FLEX_ON
    if compiled not in _flex_kernels:
        _flex_kernels[compiled] = ((torch.compile(create_block_mask, dynamic=True),
                                    torch.compile(flex_attention, dynamic=True)) if compiled
                                   else (create_block_mask, flex_attention))
    return _flex_kernels[compiled]


def forest_mask_mod(subtree_end: torch.Tensor):
    """flex_attention's mask_mod of a forest row: k <= q <= subtree_end[k]. One code object for every row, so
    the compiled kernels are reused (the row's tensor is an input of the graph, not a constant)."""
    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q <= subtree_end[kv])

    return mask_mod


def device_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: on CUDA through pinned memory, copied non_blocking (the copy is queued on the
    current stream; nothing waits for the GPU); on CPU the array's own memory, no copy."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class ForestMask:
    """The forest attention of one packed row (batch 1), for every layer of one stage."""

    def __init__(self, row: ForestRow, kernel: str, device: torch.device):
        self.kernel = kernel
        n = row.num_tokens
        if kernel == "dense":
            self.allowed = device_tensor(row.allowed(), device)
        elif kernel == "branches":
            keys = device_tensor(row.branch_keys, device)
            self.branches = []
            for j in range(len(row.branch_starts) - 1):
                q0, q1 = int(row.branch_starts[j]), int(row.branch_starts[j + 1])
                k0, k1 = int(row.branch_key_starts[j]), int(row.branch_key_starts[j + 1])
                shared = (k1 - k0) - (q1 - q0)  # ancestors outside this branch
                if shared <= q1 - q0:  # causal over ancestors + branch; the ancestors' query rows are dropped
                    self.branches.append((q0, q1, keys[k0:k1], None, shared))
                    continue
                # bottom-right causal: query i sees keys [0, shared + i]
                mask = (torch.arange(k1 - k0, device=device)[None, :]
                        <= shared + torch.arange(q1 - q0, device=device)[:, None])
                self.branches.append((q0, q1, keys[k0:k1], mask, 0))
        elif kernel == "flex":
            create_block_mask, self.flex = flex_kernels(device)
            subtree_end = device_tensor(row.subtree_end, device)
            self.block_mask = create_block_mask(forest_mask_mod(subtree_end), B=None, H=None, Q_LEN=n, KV_LEN=n,
                                                device=device)
        else:
            raise ValueError(f"unknown forest attention kernel {kernel!r}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        """q [1, heads, n, d], k/v [1, groups, n, d] -> [1, heads, n, d]."""
        gqa = k.shape[1] != q.shape[1]
        if self.kernel == "dense":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed, scale=scale, enable_gqa=gqa)
        if self.kernel == "flex":
            return self.flex(q, k, v, block_mask=self.block_mask, scale=scale, enable_gqa=gqa)
        out = torch.empty_like(q)
        for q0, q1, keys, mask, dropped_rows in self.branches:
            if mask is None:  # rows [0, dropped_rows) are the ancestors' own queries
                queries = q[:, :, keys] if dropped_rows else q[:, :, q0:q1]
                out[:, :, q0:q1] = F.scaled_dot_product_attention(
                    queries, k[:, :, keys], v[:, :, keys], is_causal=True, scale=scale,
                    enable_gqa=gqa)[:, :, dropped_rows:]
            else:
                out[:, :, q0:q1] = F.scaled_dot_product_attention(
                    q[:, :, q0:q1], k[:, :, keys], v[:, :, keys], attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out


class Norm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 and rounded once at the end, as Transformer Engine (which trained the model) does.
        # In particular layernorm1p adds the 1 in float32: `weight + 1` in bfloat16 would round every gain to
        # bfloat16's spacing near 1 (2^-7), in each of the model's norms.
        weight = self.weight.float()
        if self.zero_centered_gamma:
            weight = weight + 1
        if self.rms:
            return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).to(x.dtype)
        return F.layer_norm(x.float(), (x.shape[-1],), weight, self.bias.float(), self.eps).to(x.dtype)


class SDPACoreAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        # megatron layout: q [sq, b, heads, d], k/v [sk, b, groups, d] -> SDPA layout [b, heads, s, d].
        seq, batch, heads, dim = query.shape
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if isinstance(attention_mask, ForestMask):
            out = attention_mask.attend(q, k, v, self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
