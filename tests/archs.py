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

_T = transformers
# More architectures, for the training path only (`test_batching.py`): each with what the kit's batch plan
# must find (padding-free rows, chunked loss). ALiBi (BLOOM, MPT) cannot take packed rows; Cohere scales its
# scores after the head and Gemma 2 soft-caps them, so both keep the model's own logits.
PACKING_CONFIGS = {
    "qwen3": (lambda: _T.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8), (True, True)),
    "gemma2": (lambda: _T.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4), (True, False)),
    "gemma3": (lambda: _T.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4), (True, True)),
    "olmo2": (lambda: _T.Olmo2Config(**_COMMON, num_key_value_heads=2), (True, True)),
    "cohere": (lambda: _T.CohereConfig(**_COMMON, num_key_value_heads=2), (True, False)),
    "mixtral": (lambda: _T.MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                (True, True)),
    "falcon": (lambda: _T.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                       num_attention_heads=HEADS, new_decoder_architecture=True, num_kv_heads=2),
               (True, True)),
    "opt": (lambda: _T.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                 ffn_dim=FFN, max_position_embeddings=64, word_embed_proj_dim=HIDDEN), (True, True)),
    "bloom": (lambda: _T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS), (False, True)),
    "mpt": (lambda: _T.MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=64),
            (False, True)),
}

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
    """The tiny config of one architecture (of `CONFIGS` or `PACKING_CONFIGS`)."""
    return CONFIGS[arch]() if arch in CONFIGS else PACKING_CONFIGS[arch][0]()


def tiny_model(arch: str) -> transformers.PreTrainedModel:
    """A fresh tiny random model (a new one each call, so tests may wrap it with peft)."""
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_cached_config(arch)).eval()


@functools.cache
def _cached_config(arch: str) -> transformers.PretrainedConfig:
    return tiny_config(arch)
