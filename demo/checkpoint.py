"""Writes the demo model: a tiny Nemotron-4-architecture reward model in the released on-disk layout.

    python -m demo --out .demo/nemotron4-tiny-reward

The result is an extracted `.nemo` directory: `model_config.yaml` with NeMo's key names, a SentencePiece
tokenizer referenced as `nemo:<file>`, and `model_weights/` as a megatron-core distributed checkpoint
(torch_dist) with the `model.` prefix. Weights are random, drawn from `--seed`: the scores mean nothing,
but every part of the real loading and serving path runs on them.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from configs.model import ModelArchConfig
from configs.service import RuntimeConfig
from sharding.checkpoints.nemo_weights import save_weights
from demo.tokenizer import train_demo_tokenizer
from sharding.model import build_stage_model
from sharding.checkpoints.nemo import CONFIG_FILE, WEIGHTS_DIR, NemoCheckpoint
from sharding.process_group import destroy_model_parallel, free_port, init_model_parallel

DEMO_SHAPE = {
    "num_layers": 4,
    "hidden_size": 256,
    "ffn_hidden_size": 1024,
    "num_attention_heads": 8,
    "num_query_groups": 2,
}
# Nemotron-4-340B's shape (its released model_config.yaml), for the simulated accelerator: written with
# `--shape nemotron4-340b --no-weights` it is an architecture and the demo tokenizer, no weights.
NEMOTRON4_340B_SHAPE = {
    "num_layers": 96,
    "hidden_size": 18432,
    "ffn_hidden_size": 73728,
    "num_attention_heads": 96,
    "num_query_groups": 8,
    "padded_vocab_size": 256000,
}
SHAPES = {"tiny": DEMO_SHAPE, "nemotron4-340b": NEMOTRON4_340B_SHAPE}


def demo_model_config(tokenizer_file: str, shape: dict[str, int]) -> dict:
    """model_config.yaml content: the keys NeMo writes for Nemotron-4 reward models, at a tiny shape."""
    return {
        "mcore_gpt": True,
        "precision": 32,
        **shape,
        "kv_channels": None,
        "encoder_seq_length": 4096,
        "max_position_embeddings": 4096,
        "position_embedding_type": "rope",
        "rotary_percentage": 0.5,
        "rotary_base": 10000,
        "normalization": "layernorm1p",
        "layernorm_epsilon": 1.0e-5,
        "activation": "squared-relu",
        "bias": False,
        "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 128,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "tokenizer": {
            "library": "sentencepiece",
            "type": None,
            "model": f"nemo:{tokenizer_file}",
            "vocab_file": None,
            "merge_file": None,
            "delimiter": None,
            "sentencepiece_legacy": False,
        },
        "reward_model_type": "regression",
        "regression": {"num_attributes": 9, "merge_attributes": False, "attribute_weights": None,
                       "loss_mask_val": -100},
        "output_sequence_length": 9,
        "use_avg_pool": False,
    }


def _randomize(model: torch.nn.Module, seed: int, hidden_size: int) -> None:
    """Deterministic random weights, in parameter-name order; norms get non-trivial gamma and beta."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rm_head" in name:
                std = 1.0 / hidden_size**0.5
            elif "layernorm" in name:
                std = 0.1
            else:
                std = 0.02
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def write_demo_model(out: Path, seed: int = 0, shape: dict[str, int] | None = None, weights: bool = True) -> Path:
    """Writes the demo checkpoint to `out` (replacing it) and returns `out`. Needs no process group.
    `weights=False` writes only `model_config.yaml` and the tokenizer (what a simulated device reads)."""
    shape = shape or DEMO_SHAPE
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "model"
        tok = train_demo_tokenizer(Path(tmp) / "tokenizer.model")
        digest = hashlib.md5(tok.read_bytes()).hexdigest()
        tokenizer_file = f"{digest}_demo_tokenizer.model"
        staging.mkdir()
        shutil.copy(tok, staging / tokenizer_file)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(demo_model_config(tokenizer_file, shape), sort_keys=False))
        arch: ModelArchConfig = NemoCheckpoint.open(staging).arch
        if weights:
            runtime = RuntimeConfig()
            init_model_parallel(runtime, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                                tp=1, pp=1)
            try:
                model = build_stage_model(arch, runtime, tp=1, pp=1, pp_rank=0)
                _randomize(model, seed, arch.hidden_size)
                save_weights(model, staging / WEIGHTS_DIR)
            finally:
                destroy_model_parallel()
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".demo/nemotron4-tiny-reward"), help="Output directory.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for tokenizer training and weights.")
    parser.add_argument("--if-missing", action="store_true", help="Do nothing when --out already holds a model.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="Architecture: the tiny demo model, or Nemotron-4-340B's (only with --no-weights).")
    parser.add_argument("--no-weights", action="store_true",
                        help="Write model_config.yaml and the tokenizer only (for runtime.device: simulated).")
    args = parser.parse_args()
    if args.shape != "tiny" and not args.no_weights:
        parser.error(f"--shape {args.shape} is written with --no-weights (random weights of that size would not fit)")
    has_weights = (args.out / WEIGHTS_DIR).is_dir() or args.no_weights
    if args.if_missing and (args.out / CONFIG_FILE).is_file() and has_weights:
        print(f"demo model already at {args.out}")
        return
    write_demo_model(args.out, seed=args.seed, shape=SHAPES[args.shape], weights=not args.no_weights)
    print(f"demo {'architecture' if args.no_weights else 'model'} written to {args.out}")

