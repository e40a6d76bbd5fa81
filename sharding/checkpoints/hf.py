"""HF-format reward models on the megatron-core model: `config.json` + safetensors + `tokenizer.json`.

Supported architectures (transformers' class names in `config.json` `architectures`):
  * `LlamaForSequenceClassification` (Skywork-style): RMSNorm, SwiGLU, RoPE (+ Llama-3.1 scaling), `score`.
  * `NemotronForSequenceClassification`: layernorm1p, squared ReLU, partial RoPE, `score`.
  * `LlamaForCausalLM` reward models (Llama-3.1-Nemotron-70B-Reward-HF): reward = logit of vocab id 0 at the
    last token, so the head is `lm_head.weight[0:1]`.
The config part imports no torch (the router reads it); `load_into` reads each rank's slice of every tensor
with safetensors' lazy slicing, so no rank materializes a whole tensor it does not own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from configs.model import ModelArchConfig, RopeScaling, TokenizerRef
from sharding.checkpoints.base import CheckpointFormat, CheckpointFormatError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_PAD_MULTIPLE = 128 * 8  # embedding rows padded so any TP up to 8 divides them

ARCHITECTURES = {
    "LlamaForSequenceClassification": ("llama", "score"),
    "NemotronForSequenceClassification": ("nemotron", "score"),
    "LlamaForCausalLM": ("llama", "lm_head_token0"),
}


@dataclass(frozen=True)
class HFCheckpoint:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> HFCheckpoint:
        root = Path(path).expanduser().resolve()
        if not (root / CONFIG_FILE).is_file():
            raise ValueError(f"{root} has no {CONFIG_FILE}; expected an HF model directory")
        checkpoint = cls(root)
        if checkpoint.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{root}: architecture {checkpoint.architecture!r} is not supported; supported: {sorted(ARCHITECTURES)}"
            )
        return checkpoint

    @cached_property
    def raw_config(self) -> dict[str, Any]:
        return json.loads((self.path / CONFIG_FILE).read_text())

    @property
    def architecture(self) -> str:
        return (self.raw_config.get("architectures") or ["?"])[0]

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture][0]

    @property
    def head_kind(self) -> str:
        return ARCHITECTURES[self.architecture][1]

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        path = self.path / "tokenizer_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @cached_property
    def chat_template(self) -> str:
        """The Jinja chat template (transformers 5 writes chat_template.jinja, older ones the tokenizer config)."""
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            raise ValueError(f"{self.path} has no chat template (chat_template.jinja or tokenizer_config.json)")
        return template

    def special_token(self, name: str) -> str | None:
        token = self.tokenizer_config.get(name)
        return token.get("content") if isinstance(token, dict) else token

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        if self.head_kind == "lm_head_token0":
            return ("reward",)
        labels = self.raw_config.get("id2label") or {}
        count = int(self.raw_config.get("num_labels") or len(labels) or 1)
        names = [labels.get(str(i)) or labels.get(i) or f"LABEL_{i}" for i in range(count)]
        if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
            return ("reward",) if count == 1 else tuple(f"attribute_{i}" for i in range(count))
        return tuple(names)

    @cached_property
    def arch(self) -> ModelArchConfig:
        cfg = self.raw_config
        rope = dict(cfg.get("rope_parameters") or {})  # transformers 5; 4.x keeps these at the top level
        rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        scaling = None
        if rope_scaling:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"rope scaling type {kind!r} is not supported (only llama3)")
            scaling = RopeScaling(
                factor=rope_scaling["factor"],
                low_freq_factor=rope_scaling.get("low_freq_factor", 1.0),
                high_freq_factor=rope_scaling.get("high_freq_factor", 4.0),
                original_max_position_embeddings=rope_scaling.get("original_max_position_embeddings", 8192),
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("HF models with attention or MLP biases are not supported")
        llama = self.family == "llama"
        if llama and cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama hidden_act {cfg.get('hidden_act')!r} is not supported (silu)")
        if not llama and cfg.get("hidden_act", "relu2") != "relu2":
            raise ValueError(f"Nemotron hidden_act {cfg.get('hidden_act')!r} is not supported (relu2)")
        vocab = int(cfg["vocab_size"])
        return ModelArchConfig(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=cfg["num_attention_heads"],
            num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            normalization="rmsnorm" if llama else "layernorm1p",
            layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6) if llama else cfg.get("norm_eps", 1e-5),
            activation="swiglu" if llama else "squared-relu",
            position_embedding_type="rope",
            rotary_percentage=partial,
            rotary_base=theta,
            rope_scaling=scaling,
            bias=False,
            share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            padded_vocab_size=-(-vocab // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE,
            num_attributes=len(self.output_names),
            rm_head_bias=False,
            tokenizer=TokenizerRef(library="huggingface", model=TOKENIZER_FILE),
        )

    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        from safetensors import safe_open

        single = self.path / "model.safetensors"
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}

    def load_into(self, model) -> None:
        """Fills this rank's stage model (any TP x PP) from the safetensors files, slice by slice."""
        from sharding.checkpoints.hf_weights import load_hf_weights

        load_hf_weights(self, model, self._tensor_files())


def check_files(checkpoint: HFCheckpoint, arch: ModelArchConfig) -> None:
    """Every safetensors file the index names exists (shapes are checked by the loader on every rank)."""
    root = checkpoint.path
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in files if not (root / name).is_file()]
        if missing:
            raise CheckpointFormatError(f"{root}: {index.name} names files that do not exist: {', '.join(missing)}")
    elif not (root / "model.safetensors").is_file():
        raise CheckpointFormatError(f"{root} has neither model.safetensors nor model.safetensors.index.json")


FORMAT = CheckpointFormat(
    name="hf", checkpoint_type=HFCheckpoint,
    detect=lambda path: path.is_dir() and (path / CONFIG_FILE).is_file(),
    open=HFCheckpoint.open, check=check_files, load=HFCheckpoint.load_into,
    output_names=lambda checkpoint: checkpoint.output_names,
)
