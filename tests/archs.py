"""Tiny random causal LMs of several architectures (hidden 32, 2 blocks, vocab 128), built in milliseconds."""

from __future__ import annotations

import functools

import torch
import transformers

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 128, 32, 2, 4, 64

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=FFN, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, num_key_value_heads=2),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**_COMMON, num_key_value_heads=4),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                            n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_COMMON),
}
ARCHS = list(CONFIGS)

# Short names each architecture must expose (what users put in target_modules).
EXPECTED_NAMES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """The tiny config of one architecture."""
    return CONFIGS[arch]()


def tiny_model(arch: str) -> transformers.PreTrainedModel:
    """A fresh tiny random model (a new one each call, so tests may wrap it with peft)."""
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_cached_config(arch)).eval()


@functools.cache
def _cached_config(arch: str) -> transformers.PretrainedConfig:
    return tiny_config(arch)
