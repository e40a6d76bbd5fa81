"""The CPU workarounds for megatron-core's CUDA assumptions, in one place.

megatron-core 0.16 is written for GPUs. The parts of it this project runs assume CUDA in two ways that
matter on a CPU-only worker (tests, CI, the demo on a laptop):
  * RotaryEmbedding.get_emb moves its `inv_freq` to `torch.cuda.current_device()` on first use, and other
    helpers allocate on that device;
  * some paths call `torch.cuda.synchronize()`.
The attention-mask and dropout-RNG paths that also assume CUDA are not used at all: core attention is our
own SDPA module (`sharding.layers.SDPACoreAttention`) and the RNG tracker is the inference one.

`install()` redirects exactly those two calls to the CPU for the current (worker) process. It is called only
when the runtime config says device "cpu"; on GPU nothing here runs.
"""

from __future__ import annotations

import torch

_installed = False


def install() -> None:
    """Makes `torch.cuda.current_device()` name the CPU and `torch.cuda.synchronize()` a no-op."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.install() called in a process that has CUDA; use device cuda")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    _installed = True
