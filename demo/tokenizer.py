"""Trains the demo model's SentencePiece tokenizer on the text the project ships.

Nemotron's tokenizer is SentencePiece with bos 2 / eos 3 and the `<extra_id_N>` chat markers as single
pieces; the demo tokenizer keeps those properties at a small vocabulary. Whitespace and newlines are kept
verbatim (identity normalization) because the SteerLM template is newline-delimited.
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

CORPUS_PATH = Path(__file__).with_name("corpus.txt")
SPECIAL_PIECES = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "\n")
DEMO_VOCAB_SIZE = 2048


def train_demo_tokenizer(out_path: Path, *, vocab_size: int = DEMO_VOCAB_SIZE) -> Path:
    """Writes a SentencePiece model to `out_path` and returns it. BPE training is deterministic for a given corpus."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(CORPUS_PATH),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=list(SPECIAL_PIECES),
        unk_id=0,
        pad_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,
        minloglevel=2,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path
