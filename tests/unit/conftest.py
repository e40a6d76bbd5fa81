"""Shared unit-test fixtures: a demo SentencePiece tokenizer trained once per session."""

from __future__ import annotations

import pytest

from deployments.prompt import SentencePieceTokenizer
from demo.tokenizer import train_demo_tokenizer


@pytest.fixture(scope="session")
def demo_tokenizer_path(tmp_path_factory):
    return train_demo_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tok.model")


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(demo_tokenizer_path)
