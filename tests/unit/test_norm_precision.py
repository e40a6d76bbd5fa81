"""layernorm1p in bfloat16 computes as Transformer Engine does: `weight + 1` and the normalisation in
float32, one rounding to bfloat16 at the end. Against a float64 reference of the same bfloat16 inputs its
error is bfloat16's output rounding alone; adding the 1 in bfloat16 (the old way) rounds every gain to a
spacing of 2^-7 near 1 and is measurably worse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from sharding.layers import Norm

HIDDEN = 1024


def _norm(normalization: str = "LayerNorm") -> Norm:
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=8, normalization=normalization,
                               layernorm_zero_centered_gamma=True, use_cpu_initialization=True,
                               params_dtype=torch.bfloat16, bf16=True)
    norm = Norm(config, HIDDEN, eps=1e-5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained zero-centred gains are small; biases too
        norm.weight.copy_(0.05 * torch.randn(HIDDEN, generator=generator))
        if norm.bias is not None:
            norm.bias.copy_(0.02 * torch.randn(HIDDEN, generator=generator))
    return norm


def _inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return (3 * torch.randn(64, 2, HIDDEN, generator=generator) + 0.5).to(torch.bfloat16)  # [S, B, H]


def _reference(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """float64 of the same bfloat16 values: (x - mean) / sqrt(var + eps) * (1 + w) + b."""
    x64 = x.double()
    gain = norm.weight.detach().double() + 1
    if norm.rms:
        return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * gain
    centred = x64 - x64.mean(-1, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps) * gain
    return out + norm.bias.detach().double()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want).abs() / want.abs().clamp_min(1e-3)).mean())


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_bf16_norm_error_is_output_rounding_only(normalization):
    norm, x = _norm(normalization), _inputs()
    with torch.no_grad():
        got = norm(x)
    want = _reference(x, norm)
    assert got.dtype == torch.bfloat16
    rounding_only = _relative_error(want.to(torch.bfloat16), want)
    assert _relative_error(got, want) <= 1.05 * rounding_only
    # at most one bfloat16 step from the correctly rounded reference, everywhere
    ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-3)
    assert bool(((got.double() - want).abs() <= ulp).all())


def test_adding_the_one_in_bf16_was_worse():
    norm, x = _norm(), _inputs()
    want = _reference(x, norm)
    with torch.no_grad():
        fixed = norm(x)
        old = F.layer_norm(x, (HIDDEN,), norm.weight + 1, norm.bias, norm.eps)  # the 1 added in bfloat16
    error_fixed, error_old = _relative_error(fixed, want), _relative_error(old, want)
    assert error_old > 1.3 * error_fixed, (error_old, error_fixed)
