"""GPU tier: the same code on CUDA + bf16 + NCCL, selected by config alone.

Without CUDA the tier skips itself. `pytest tests/gpu --tier-device cpu` runs the same tests on the CPU in
float32 with gloo instead (what `python -m bench.gpu_check --dry-run` does), so the tier's own code is
exercised where there is no GPU; there the "low precision" side equals the float32 reference.

The float32 CPU reference always comes from a child process with CUDA hidden (`tests.gpu.cpu_side`):
megatron-core's CPU path (`sharding.cpu_compat`) redirects torch.cuda calls for the whole process, so it
cannot share a process with a CUDA forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    parser.addoption("--tier-device", choices=("cuda", "cpu"), default="cuda",
                     help="Device of the GPU tier: cuda (bf16, NCCL; skipped without CUDA) or cpu (float32, gloo).")


def tier_device(config) -> str:
    return config.getoption("--tier-device", default="cuda")


def pytest_collection_modifyitems(config, items):
    import torch

    if tier_device(config) == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (or --tier-device cpu)")
        for item in items:
            if HERE in Path(item.path).resolve().parents:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def runtime(request):
    """The runtime under test: CUDA + bf16 + NCCL, or CPU + float32 + gloo with --tier-device cpu."""
    from configs.service import RuntimeConfig

    if tier_device(request.config) == "cpu":
        return RuntimeConfig(device="cpu", dtype="float32", backend="gloo")
    return RuntimeConfig(device="cuda", dtype="bfloat16", backend="nccl", gpus_per_node=1)
