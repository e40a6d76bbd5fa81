"""The demo model: a tiny Nemotron-4-architecture reward model with random weights, written in the released
on-disk layout (extracted `.nemo`: `model_config.yaml`, a SentencePiece tokenizer, torch_dist weights), so
every loading and serving path runs for real without downloading anything.

    python -m demo --out .demo/nemotron4-tiny-reward [--seed 0] [--if-missing]

`demo.checkpoint` writes the model, `demo.tokenizer` trains its tokenizer on `demo/corpus.txt`.
"""

from demo.checkpoint import write_demo_model

__all__ = ["write_demo_model"]
