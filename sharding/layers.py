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
    the all-masked blocks (other tries, other branches). Compiled with `torch.compile` on CUDA (eager
    flex attention materializes the scores); runs eagerly on CPU (tests).
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

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from sharding.forest import ForestRow

_compiled_flex_attention = None


def _flex_attention(device: torch.device):
    """flex_attention, compiled once per process on CUDA (dynamic shapes: every row has its own length)."""
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex_attention


class ForestMask:
    """The forest attention of one packed row (batch 1), for every layer of one stage."""

    def __init__(self, row: ForestRow, kernel: str, device: torch.device):
        self.kernel = kernel
        n = row.num_tokens
        if kernel == "dense":
            self.allowed = torch.from_numpy(row.allowed()).to(device)
        elif kernel == "branches":
            keys = torch.from_numpy(row.branch_keys).to(device)
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
            from torch.nn.attention.flex_attention import create_block_mask

            subtree_end = torch.from_numpy(row.subtree_end).to(device)

            def mask_mod(b, h, q, kv):
                return (kv <= q) & (q <= subtree_end[kv])

            self.block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device,
                                                _compile=device.type == "cuda")
            self.flex = _flex_attention(device)
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
