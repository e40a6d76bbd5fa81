"""Writes tiny random HF reward models with transformers (a test dependency only), with a BPE tokenizer
trained on the demo corpus and a Llama-3-style chat template, so the service can be compared against
transformers' own forward and `apply_chat_template`."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
)
SPECIAL = ["<|pad|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def _tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from demo.tokenizer import CORPUS_PATH

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(CORPUS_PATH)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def write_hf_model(kind: str, out: Path, seed: int = 0):
    """kind: llama-seqcls | nemotron-seqcls | llama-causal. Returns the transformers model (eval mode)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, NemotronConfig,
                              NemotronForSequenceClassification)

    torch.manual_seed(seed)
    if kind == "llama-seqcls":
        model = LlamaForSequenceClassification(LlamaConfig(**COMMON, max_position_embeddings=16384, num_labels=1,
                                                           rope_theta=500000.0, rope_scaling=LLAMA3_ROPE))
    elif kind == "nemotron-seqcls":
        model = NemotronForSequenceClassification(NemotronConfig(**COMMON, max_position_embeddings=4096, head_dim=16,
                                                                 num_labels=3, id2label={0: "helpful", 1: "honest", 2: "harmless"}))
    elif kind == "llama-causal":
        model = LlamaForCausalLM(LlamaConfig(**COMMON, max_position_embeddings=4096))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.2 if "norm" in name else 0.05)  # non-trivial norms
    model.eval()
    model.save_pretrained(out)
    _tokenizer(out)
    return model


def transformers_rewards(model, kind: str, token_batch: list[list[int]]) -> torch.Tensor:
    """transformers' own forward on a right-padded batch, on the model's device and in its dtype; float32 on
    the CPU back. Causal-LM reward = logit of token 0 at the end."""
    width = max(len(t) for t in token_batch)
    ids = torch.zeros((len(token_batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_batch):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
    if kind == "llama-causal":
        return torch.stack([logits[i, len(t) - 1, 0:1] for i, t in enumerate(token_batch)])
    return logits
