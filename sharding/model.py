"""The reward model: megatron-core's GPTModel without its LM output layer, plus a float32 reward head.

A pipeline stage builds only its layers: the embedding on the first stage, the final layernorm and the
reward head (`rm_head`, row-parallel hidden -> num_attributes) on the last. The LM `output_layer` is never
built (the released checkpoint stores one; a reward model never reads it).

Two input layouts (`sharding.micro_batches`): right-padded `[b, s]` token ids with lengths (positions
0..s-1, causal attention, readout at `length - 1`), or one packed token-forest row (`ForestInputs`: per-token
position ids, the forest mask, readout node indices). megatron-core's `GPTModel.forward` ignores
`position_ids` for RoPE (it builds the rotary table for 0..s-1), so the forest path runs the embedding
and the decoder itself with the rotary table gathered at each token's position id: `[s, b, 1, d]`, which
megatron's unfused `apply_rotary_pos_emb` broadcasts over the heads like its own `[s, 1, 1, d]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.activations import squared_relu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from configs.model import ModelArchConfig
from configs.service import RuntimeConfig
from sharding.forest import ForestRow
from sharding.layers import ForestMask, Norm, SDPACoreAttention, device_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = {"squared-relu": squared_relu, "gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu,
               "swiglu": torch.nn.functional.silu}


@dataclass
class ForestInputs:
    """One forest row on a device: what every stage needs besides the hidden states."""

    position_ids: torch.Tensor  # int64 [1, n]
    mask: ForestMask
    readout: torch.Tensor  # int64 [k]: node index of each scored sequence

    @classmethod
    def from_row(cls, row: ForestRow, runtime: RuntimeConfig, device: torch.device) -> ForestInputs:
        return cls(
            position_ids=device_tensor(row.positions, device).view(1, -1),
            mask=ForestMask(row, forest_kernel(runtime), device),
            readout=device_tensor(row.readout, device),
        )


def forest_kernel(runtime: RuntimeConfig) -> str:
    if runtime.forest_attention != "auto":
        return runtime.forest_attention
    return "flex" if runtime.device == "cuda" else "branches"


def micro_batch_shape(micro_batch) -> tuple[int, int]:
    """(seq, batch) of one micro-batch's hidden states: a ForestRow is one packed row, a padded
    `(tokens [b, s], lengths [b])` is b rows of s."""
    if isinstance(micro_batch, ForestRow):
        return micro_batch.num_tokens, 1
    tokens, _ = micro_batch
    return tokens.shape[1], tokens.shape[0]


def micro_batch_inputs(micro_batch, runtime: RuntimeConfig, device: torch.device, first_stage: bool
                       ) -> tuple[torch.Tensor | None, dict]:
    """(input ids on the first stage else None, model kwargs) of one micro-batch: a ForestRow or a padded
    `(tokens [b, s], lengths [b])`. On CUDA every array goes through pinned memory, copied non_blocking: no
    host-device copy here waits for the GPU."""
    if isinstance(micro_batch, ForestRow):
        ids = device_tensor(micro_batch.tokens, device).view(1, -1) if first_stage else None
        return ids, {"forest": ForestInputs.from_row(micro_batch, runtime, device)}
    tokens, lengths = micro_batch
    ids = device_tensor(tokens, device) if first_stage else None
    return ids, {"lengths": device_tensor(lengths, device)}


def transformer_config(arch: ModelArchConfig, runtime: RuntimeConfig, tp: int, pp: int,
                       sequence_parallel: bool = False) -> TransformerConfig:
    dtype = DTYPES[runtime.dtype]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.layernorm_epsilon,
        layernorm_zero_centered_gamma=arch.normalization == "layernorm1p",
        normalization="RMSNorm" if arch.normalization == "rmsnorm" else "LayerNorm",
        activation_func=ACTIVATIONS[arch.activation],
        gated_linear_unit=arch.activation == "swiglu",
        add_bias_linear=arch.bias,
        add_qkv_bias=arch.bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=runtime.device == "cpu",
        perform_initialization=False,
        sequence_parallel=sequence_parallel,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec():
    spec = get_gpt_layer_local_spec()
    spec.submodules.input_layernorm = Norm
    spec.submodules.pre_mlp_layernorm = Norm
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


class RewardGPTModel(GPTModel):
    """GPTModel whose last stage ends in final layernorm -> hidden state at `length - 1` -> rm_head."""

    def __init__(self, config: TransformerConfig, arch: ModelArchConfig, pre_process: bool, post_process: bool):
        block = TransformerBlockSubmodules(
            layer_specs=[layer_spec()] * get_num_layers_to_build(config), layer_norm=Norm
        )
        # post_process=False keeps GPTModel from building the LM output layer; the last stage's pieces
        # (final layernorm, reward head) are added below.
        super().__init__(
            config=config,
            transformer_layer_spec=block,
            vocab_size=arch.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=False,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=arch.rotary_percentage,
            rotary_base=arch.rotary_base,
            rope_scaling=arch.rope_scaling is not None,
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
        )
        self.is_last_stage = post_process
        if post_process:
            self.decoder.final_layernorm = Norm(config, config.hidden_size, eps=config.layernorm_epsilon)
            # The head reads whole hidden states (gathered over the sequence under SP): no sequence split here.
            head_config = TransformerConfig(**{**config.__dict__, "params_dtype": torch.float32,
                                               "sequence_parallel": False})
            self.rm_head = tensor_parallel.RowParallelLinear(
                config.hidden_size,
                arch.num_attributes,
                config=head_config,
                init_method=head_config.init_method,
                bias=arch.rm_head_bias,
                input_is_parallel=False,
                skip_bias_add=False,
            )

    def forward(self, input_ids: torch.Tensor | None, lengths: torch.Tensor | None = None, *,
                forest: ForestInputs | None = None) -> torch.Tensor:
        """input_ids [B, S] (first stage; None elsewhere, the input tensor is set by the pipeline) with
        `lengths` [B] (padded) or `forest` (B = 1, one packed row) -> hidden states [S, B, H] on inner
        stages, float32 rewards [sequences, num_attributes] on the last."""
        if forest is not None:
            return self._forward_forest(input_ids, forest)
        if input_ids is not None:
            seq = input_ids.shape[1]
            position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        else:
            position_ids = None
        hidden = super().forward(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
        if not self.is_last_stage:
            return hidden
        hidden = self._whole_sequence(hidden)
        last = hidden[lengths - 1, torch.arange(hidden.shape[1], device=hidden.device)]
        rewards, _ = self.rm_head(last.float())
        return rewards

    def _whole_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last stage's final hidden states over the whole sequence: under sequence parallelism each TP rank
        holds 1/TP of the tokens (the final norm ran on them), all-gathered here once for the readout."""
        if not self.config.sequence_parallel:
            return hidden
        return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)

    def _forward_forest(self, input_ids: torch.Tensor | None, forest: ForestInputs) -> torch.Tensor:
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=forest.position_ids)
        # The table megatron builds for positions 0..max-1 ([max, 1, 1, d]), gathered per token: [s, b, 1, d].
        table = self.rotary_pos_emb(self.max_sequence_length)
        rotary = table[:, 0][forest.position_ids.transpose(0, 1)]
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=forest.mask, rotary_pos_emb=rotary)
        if not self.is_last_stage:
            return hidden
        # One gather of every scored node and one head call for the row: one [k, H] x [H, A] product and one TP
        # all-reduce, not one per sequence. (CPU BLAS may round a [k, H] product differently from the [1, H]
        # one of a sequence scored alone: last-bit float32 differences, inside the tests' 1e-5.)
        last = self._whole_sequence(hidden)[forest.readout, 0].float()
        rewards, _ = self.rm_head(last)
        return rewards


def build_stage_model(arch: ModelArchConfig, runtime: RuntimeConfig, tp: int, pp: int, pp_rank: int,
                      sequence_parallel: bool = False) -> RewardGPTModel:
    config = transformer_config(arch, runtime, tp, pp, sequence_parallel)
    model = RewardGPTModel(config, arch, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1)
    if runtime.device == "cuda":
        model = model.cuda()
    return model.eval()
