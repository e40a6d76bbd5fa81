"""Maps HF Llama / Nemotron tensors onto this rank's slice of the megatron-core reward model.

Every tensor is read through safetensors' lazy slices, so a rank reads only the rows or columns it owns:
  * q/k/v are interleaved per query group into `linear_qkv` (for each local group: its query heads, then
    its key head, then its value head) — the layout megatron's attention splits;
  * SwiGLU's gate and up projections become `linear_fc1` as [gate; up] of this rank's FFN slice;
  * the embedding's rows are this rank's slice of the padded vocabulary (pad rows stay zero);
  * the reward head is `score.weight` or, for causal-LM reward models, `lm_head.weight[0:1]`, split on its
    input dim like megatron's row-parallel linear.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors import safe_open


class _SliceReader:
    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles: dict[Path, object] = {}

    def __call__(self, name: str, rows: slice = slice(None), cols: slice | None = None) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"tensor {name} is missing from the checkpoint")
        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        view = self.handles[path].get_slice(name)
        return view[rows] if cols is None else view[rows, cols]


def load_hf_weights(checkpoint, model: torch.nn.Module, files: dict[str, Path]) -> None:
    arch = checkpoint.arch
    llama = checkpoint.family == "llama"
    tp = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    read = _SliceReader(files)
    d, per_group = arch.head_dim, arch.num_attention_heads // arch.num_query_groups
    groups_local = arch.num_query_groups // tp
    heads_local = arch.num_attention_heads // tp
    ffn_local = arch.ffn_hidden_size // tp
    hidden_local = arch.hidden_size // tp
    vocab = int(checkpoint.raw_config["vocab_size"])

    def part(size: int) -> slice:
        return slice(r * size, (r + 1) * size)

    def norm(prefix: str, param_name: str) -> torch.Tensor:
        return read(f"{prefix}.{param_name.rsplit('.', 1)[1]}")

    def qkv(layer: str) -> torch.Tensor:
        chunks = []
        for j in range(groups_local):
            g = r * groups_local + j
            chunks.append(read(f"{layer}.self_attn.q_proj.weight", slice(g * per_group * d, (g + 1) * per_group * d)))
            chunks.append(read(f"{layer}.self_attn.k_proj.weight", slice(g * d, (g + 1) * d)))
            chunks.append(read(f"{layer}.self_attn.v_proj.weight", slice(g * d, (g + 1) * d)))
        return torch.cat(chunks)

    def embedding(shape: torch.Size) -> torch.Tensor:
        out = torch.zeros(shape, dtype=torch.float32)
        lo, hi = r * shape[0], (r + 1) * shape[0]
        if lo < vocab:
            out[: min(hi, vocab) - lo] = read("model.embed_tokens.weight", slice(lo, min(hi, vocab)))
        return out

    state: dict[str, torch.Tensor] = {}
    layers = model.decoder.layers
    for name, param in model.named_parameters():
        if name == "embedding.word_embeddings.weight":
            tensor = embedding(param.shape)
        elif name.startswith("decoder.final_layernorm."):
            tensor = norm("model.norm", name)
        elif name == "rm_head.weight":
            source = "lm_head.weight" if checkpoint.head_kind == "lm_head_token0" else "score.weight"
            rows = slice(0, 1) if checkpoint.head_kind == "lm_head_token0" else slice(None)
            tensor = read(source, rows, part(hidden_local))
        elif name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            layer = f"model.layers.{layers[int(index)].layer_number - 1}"
            if rest.startswith("input_layernorm."):
                tensor = norm(f"{layer}.input_layernorm", rest)
            elif rest.startswith("pre_mlp_layernorm."):
                tensor = norm(f"{layer}.post_attention_layernorm", rest)
            elif rest == "self_attention.linear_qkv.weight":
                tensor = qkv(layer)
            elif rest == "self_attention.linear_proj.weight":
                tensor = read(f"{layer}.self_attn.o_proj.weight", slice(None), part(heads_local * d))
            elif rest == "mlp.linear_fc1.weight" and llama:
                tensor = torch.cat([read(f"{layer}.mlp.gate_proj.weight", part(ffn_local)),
                                    read(f"{layer}.mlp.up_proj.weight", part(ffn_local))])
            elif rest == "mlp.linear_fc1.weight":
                tensor = read(f"{layer}.mlp.up_proj.weight", part(ffn_local))
            elif rest == "mlp.linear_fc2.weight":
                tensor = read(f"{layer}.mlp.down_proj.weight", slice(None), part(ffn_local))
            else:
                raise KeyError(f"no HF tensor maps to {name}")
        else:
            raise KeyError(f"no HF tensor maps to {name}")
        if tensor.shape != param.shape:
            raise ValueError(f"{name}: HF slice has shape {tuple(tensor.shape)}, the model wants {tuple(param.shape)}")
        state[name] = tensor
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name].to(param.dtype))
