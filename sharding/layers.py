"""The two modules this project plugs into megatron-core's local layer spec.

* `Norm`: LayerNorm, LayerNorm with the weight stored zero-centred (NeMo's "layernorm1p", applied as
  weight + 1, the 1 added in float32), or RMSNorm (Llama), chosen by the TransformerConfig; computed in
  float32 whatever the parameter dtype, as Transformer Engine computes it. megatron's torch norm refuses
  `layernorm_zero_centered_gamma`, and apex / TE are not installed everywhere, so the norm is ours. Its
  parameters keep megatron's names (`weight`, `bias`), so the local spec's key map reads
  Transformer-Engine checkpoints.
* `SDPACoreAttention`: core attention on `torch.nn.functional.scaled_dot_product_attention` with a causal
  mask. It replaces megatron's `DotProductAttention`, which builds its mask on CUDA and forks a CUDA RNG for
  dropout, and it is the fast path on GPU. Right padding + causal attention means
  pads never influence the positions that are scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


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
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
