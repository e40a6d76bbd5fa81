"""Shared unit-test fixtures: a demo SentencePiece tokenizer trained once per session, and an HF chat-template
prompt (a byte-level BPE tokenizer, tests/hf_models.py) built once per session."""

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


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    from tests.hf_models import _tokenizer

    out = tmp_path_factory.mktemp("hf_tok")
    _tokenizer(out)
    return str(out / "tokenizer.json")


@pytest.fixture(scope="session")
def hf_chat_prompt(hf_tokenizer_path):
    from deployments.chat_template import ChatTemplatePrompt
    from tests.hf_models import CHAT_TEMPLATE

    return ChatTemplatePrompt(hf_tokenizer_path, CHAT_TEMPLATE,
                              {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
