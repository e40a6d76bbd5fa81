"""The reward model's architecture, in the key names of NeMo's `model_config.yaml`.

Only the keys the service needs are fields; each checkpoint format reads its own config into it
(`sharding.checkpoints.nemo.arch_from_nemo_config` picks them out of a full NeMo config, which holds many
training-only keys, so that the released file can be read as it is; `sharding.checkpoints.hf` reads
`config.json`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from configs.base import StrictModel


class TokenizerRef(StrictModel):
    library: Literal["sentencepiece", "huggingface"] = Field(
        description="`sentencepiece` (NeMo checkpoints) or `huggingface` (tokenizer.json of an HF checkpoint)."
    )
    model: str = Field(description="Tokenizer model file; `nemo:<file>` means a file inside the checkpoint.")


class RopeScaling(StrictModel):
    """Llama-3.1 style RoPE frequency scaling (the only kind megatron-core's RotaryEmbedding applies)."""

    factor: float = Field(gt=0, description="Scaling factor for low frequencies.")
    low_freq_factor: float = Field(default=1.0, description="Llama-3.1 `low_freq_factor`.")
    high_freq_factor: float = Field(default=4.0, description="Llama-3.1 `high_freq_factor`.")
    original_max_position_embeddings: int = Field(default=8192, gt=0, description="Pre-scaling context length.")


class ModelArchConfig(StrictModel):
    num_layers: int = Field(gt=0, description="Transformer layers.")
    hidden_size: int = Field(gt=0, description="Hidden width.")
    ffn_hidden_size: int = Field(gt=0, description="MLP inner width (not gated).")
    num_attention_heads: int = Field(gt=0, description="Query heads.")
    num_query_groups: int = Field(gt=0, description="Key/value heads (grouped-query attention).")
    kv_channels: int | None = Field(default=None, gt=0, description="Head dim; hidden/heads when null.")
    normalization: Literal["layernorm1p", "layernorm", "rmsnorm"] = Field(
        description="`layernorm1p` stores the LayerNorm weight zero-centred (applied as weight + 1)."
    )
    layernorm_epsilon: float = Field(gt=0, description="LayerNorm epsilon.")
    activation: Literal["squared-relu", "gelu", "relu", "swiglu"] = Field(
        description="MLP activation; `swiglu` is gated (fc1 holds gate and up projections)."
    )
    position_embedding_type: Literal["rope"] = Field(description="Only rotary embeddings are served.")
    rotary_percentage: float = Field(gt=0, le=1, description="Share of each head dim that is rotated.")
    rotary_base: float = Field(default=10000, gt=0, description="RoPE base (theta).")
    rope_scaling: RopeScaling | None = Field(default=None, description="Llama-3.1 RoPE scaling, if any.")
    bias: bool = Field(description="Whether the linear layers have biases.")
    share_embeddings_and_output_weights: bool = Field(description="Tied LM head; unused by a reward model.")
    max_position_embeddings: int = Field(gt=0, description="Context limit in tokens.")
    padded_vocab_size: int = Field(gt=0, description="Rows of the embedding table.")
    num_attributes: int = Field(gt=0, description="Outputs of the reward head (`regression.num_attributes`).")
    rm_head_bias: bool = Field(default=True, description="Whether the reward head has a bias.")
    tokenizer: TokenizerRef = Field(description="Tokenizer reference.")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def layer_matrix_parameters(self) -> int:
        """Weight-matrix parameters of one decoder layer: QKV, output projection, MLP (what its GEMMs read)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        fc1_rows = 2 * f if self.activation == "swiglu" else f
        return h * (q + 2 * kv) + q * h + h * fc1_rows + f * h

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: its matrices, two norms (and biases)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        fc1_rows = 2 * f if self.activation == "swiglu" else f
        weights = self.layer_matrix_parameters
        norms = 2 * h * (1 if self.normalization == "rmsnorm" else 2)
        biases = (q + 2 * kv) + h + fc1_rows + h if self.bias else 0
        return weights + norms + biases

    def stage_parameters(self, pipeline_parallel_size: int, stage: int) -> int:
        """Parameters a pipeline stage holds: its layers, the embedding on the first, the final norm and the
        reward head on the last (the LM output layer is never built)."""
        params = self.num_layers // pipeline_parallel_size * self.layer_parameters
        if stage == 0:
            params += self.padded_vocab_size * self.hidden_size
        if stage == pipeline_parallel_size - 1:
            params += self.hidden_size * (1 if self.normalization == "rmsnorm" else 2)
            params += self.num_attributes * (self.hidden_size + int(self.rm_head_bias))
        return params

    def max_parameters_per_gpu(self, tensor_parallel_size: int, pipeline_parallel_size: int) -> int:
        """The largest share of parameters one GPU holds at TP x PP (tensor-parallel slices of its stage)."""
        return max(self.stage_parameters(pipeline_parallel_size, s) for s in range(pipeline_parallel_size)
                   ) // tensor_parallel_size

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelArchConfig:
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads} and kv_channels is not set"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.rope_scaling is not None and (
            self.rope_scaling.low_freq_factor, self.rope_scaling.high_freq_factor,
            self.rope_scaling.original_max_position_embeddings) != (1.0, 4.0, 8192):
            raise ValueError(
                f"rope_scaling {self.rope_scaling.model_dump()} is not supported: megatron-core applies Llama-3.1 "
                "scaling with low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192"
            )
        rotary_dim = self.head_dim * self.rotary_percentage
        if rotary_dim != int(rotary_dim) or int(rotary_dim) % 2:
            raise ValueError(
                f"rotary_percentage {self.rotary_percentage} of head dim {self.head_dim} gives "
                f"{rotary_dim}, which must be an even whole number"
            )
        return self
