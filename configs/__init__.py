"""Typed configuration: pure pydantic models, no I/O beyond what pydantic does."""

from configs.model import ModelArchConfig
from configs.service import (
    ATTRIBUTE_NAMES,
    DEFAULT_WEIGHTS,
    ParallelConfig,
    RouterConfig,
    RuntimeConfig,
    ScoringConfig,
    ServiceConfig,
)

__all__ = [
    "ATTRIBUTE_NAMES",
    "DEFAULT_WEIGHTS",
    "ModelArchConfig",
    "ParallelConfig",
    "RouterConfig",
    "RuntimeConfig",
    "ScoringConfig",
    "ServiceConfig",
]
